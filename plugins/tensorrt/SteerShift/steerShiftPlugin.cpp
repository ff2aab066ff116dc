#include "steerShiftPlugin.h"

#include "steerDigest.h"
#include "steerKernels.h"

#include <memory>
#include <utility>

using namespace nvinfer1;

namespace aligner
{
namespace trt
{
namespace
{
constexpr char const* kName = contract::kSteerShift;

char const* versionString(int32_t version) noexcept
{
    return version == 1 ? contract::kSteerShiftVersion1 : contract::kSteerShiftVersion2;
}
} // namespace

SteerShiftPlugin::SteerShiftPlugin(int32_t version, std::vector<float> vector)
    : mVersion(version)
    , mVector(std::move(vector))
{
    mSerialFields.emplace_back(
        "vector", mVector.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(mVector.size()));
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
}

std::string SteerShiftPlugin::constantsDigest() const
{
    ConstantsDigest digest;
    digest.addFloats("vector", mVector.data(), mVector.size());
    return digest.hex();
}

IPluginCapability* SteerShiftPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SteerShiftPlugin::clone() noexcept
{
    try
    {
        return new SteerShiftPlugin(mVersion, mVector);
    }
    catch (...)
    {
        reportError("SteerShift: out of memory in clone");
        return nullptr;
    }
}

char const* SteerShiftPlugin::getPluginName() const noexcept
{
    return kName;
}

char const* SteerShiftPlugin::getPluginVersion() const noexcept
{
    return versionString(mVersion);
}

char const* SteerShiftPlugin::getPluginNamespace() const noexcept
{
    return contract::kPluginNamespace;
}

bool SteerShiftPlugin::checkInputCount(int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs)
    {
        reportError("SteerShift: expected 2 inputs (hidden, gate), got " + std::to_string(nbInputs));
        return false;
    }
    return true;
}

bool SteerShiftPlugin::checkHiddenSize(int64_t hiddenSize) const noexcept
{
    if (hiddenSize >= 0 && hiddenSize != static_cast<int64_t>(mVector.size()))
    {
        reportError("SteerShift: plugin field 'vector' has " + std::to_string(mVector.size())
            + " values but the hidden size H is " + std::to_string(hiddenSize));
        return false;
    }
    return true;
}

int32_t SteerShiftPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t SteerShiftPlugin::getAliasedInput(int32_t outputIndex) noexcept
{
    // out may alias hidden (§5): the kernel then skips rows whose gate is 0.
    return outputIndex == 0 ? 0 : -1;
}

int32_t SteerShiftPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || !checkInputCount(nbInputs))
    {
        return -1;
    }
    if (!isHiddenType(inputTypes[0]))
    {
        reportError("SteerShift: input 'hidden' must be float32, float16 or bfloat16");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t SteerShiftPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbOutputs != 1 || !checkInputCount(nbInputs))
    {
        return -1;
    }
    if (inputs[0].nbDims != 3 || inputs[1].nbDims != 1)
    {
        reportError("SteerShift: expected hidden [B,S,H] and gate [B]");
        return -1;
    }
    if (inputs[0].d[2]->isConstant() && !checkHiddenSize(inputs[0].d[2]->getConstantValue()))
    {
        return -1;
    }
    outputs[0] = inputs[0];
    return 0;
}

bool SteerShiftPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 1 || nbInputs != kNbInputs || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return isHiddenType(desc.type);
    }
    if (pos == nbInputs)
    {
        return desc.type == inOut[0].desc.type; // out has hidden's dtype
    }
    return desc.type == DataType::kFLOAT; // gate
}

int32_t SteerShiftPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 1 || !checkInputCount(nbInputs) || in[0].desc.dims.nbDims != 3)
    {
        return -1;
    }
    return checkHiddenSize(in[0].desc.dims.d[2]) ? 0 : -1;
}

int32_t SteerShiftPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 1 || !checkInputCount(nbInputs) || !checkHiddenSize(in[0].dims.d[2]))
    {
        return -1;
    }
    return mDeviceConstants.upload(kName, mVector) ? 0 : -1;
}

int32_t SteerShiftPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    ops::Storage storage;
    if (!storageFor(inputDesc[0].type, storage) || !mDeviceConstants.upload(kName, mVector))
    {
        return -1;
    }
    Dims const& hidden = inputDesc[0].dims;
    auto const kernel = mVersion == 1 ? aligner_kernel_steer_shift : aligner_kernel_steer_shift_v2;
    int32_t const status = kernel(static_cast<int32_t>(storage), inputs[0], hidden.d[0], hidden.d[1], hidden.d[2],
        static_cast<float const*>(inputs[1]), mDeviceConstants.data(), outputs[0], stream);
    if (status != cudaSuccess)
    {
        reportError(std::string("SteerShift: kernel launch failed: ")
            + cudaGetErrorString(static_cast<cudaError_t>(status)));
        return -1;
    }
    return 0;
}

IPluginV3* SteerShiftPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* SteerShiftPlugin::getFieldsToSerialize() noexcept
{
    return &mSerialCollection;
}

SteerShiftPluginCreator::SteerShiftPluginCreator(int32_t version)
    : mVersion(version == 1 ? 1 : 2)
{
    mFields.emplace_back("vector", nullptr, PluginFieldType::kFLOAT32, 0);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* SteerShiftPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        std::vector<float> vector;
        if (!checkKnownFields(kName, fc, {"vector"}) || !readFloatField(kName, fc, "vector", -1, vector))
        {
            return nullptr;
        }
        std::unique_ptr<SteerShiftPlugin> plugin(new SteerShiftPlugin(mVersion, std::move(vector)));
        if (phase == TensorRTPhase::kRUNTIME)
        {
            recordConstantsDigest(name, kName, versionString(mVersion), plugin->constantsDigest());
        }
        return plugin.release();
    }
    catch (...)
    {
        reportError("SteerShift: out of memory in createPlugin");
        return nullptr;
    }
}

PluginFieldCollection const* SteerShiftPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* SteerShiftPluginCreator::getPluginName() const noexcept
{
    return kName;
}

char const* SteerShiftPluginCreator::getPluginVersion() const noexcept
{
    return versionString(mVersion);
}

char const* SteerShiftPluginCreator::getPluginNamespace() const noexcept
{
    return contract::kPluginNamespace;
}

} // namespace trt
} // namespace aligner
