#include "steerGatePlugin.h"

#include "steerKernels.h"

#include <cmath>
#include <utility>

using namespace nvinfer1;

namespace aligner
{
namespace trt
{
namespace
{
constexpr char const* kName = "SteerGate";
} // namespace

SteerGatePlugin::SteerGatePlugin(std::vector<float> direction, float bias)
    : mDirection(std::move(direction))
    , mBias(bias)
{
    if (!mDirection.empty())
    {
        mDeviceHost = mDirection;
        mDeviceHost.push_back(mBias);
        mSerialFields.emplace_back("direction", mDirection.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mDirection.size()));
        mSerialFields.emplace_back("bias", &mBias, PluginFieldType::kFLOAT32, 1);
    }
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
}

IPluginCapability* SteerGatePlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SteerGatePlugin::clone() noexcept
{
    try
    {
        return new SteerGatePlugin(mDirection, mBias);
    }
    catch (...)
    {
        reportError("SteerGate: out of memory in clone");
        return nullptr;
    }
}

char const* SteerGatePlugin::getPluginName() const noexcept
{
    return kName;
}

char const* SteerGatePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SteerGatePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

bool SteerGatePlugin::checkInputCount(int32_t nbInputs) const noexcept
{
    int32_t const expected = constantsAreInputs() ? kInputsWithConstantInputs : kInputsWithFields;
    if (nbInputs != expected)
    {
        reportError(std::string("SteerGate: expected ") + std::to_string(expected) + " inputs ("
            + (constantsAreInputs() ? "no 'direction'/'bias' fields, so they must be inputs 3 and 4"
                                    : "hidden, attention_mask, gate_in")
            + "), got " + std::to_string(nbInputs));
        return false;
    }
    return true;
}

bool SteerGatePlugin::checkHiddenSize(int64_t hiddenSize) const noexcept
{
    if (!constantsAreInputs() && hiddenSize >= 0 && hiddenSize != static_cast<int64_t>(mDirection.size()))
    {
        reportError("SteerGate: plugin field 'direction' has " + std::to_string(mDirection.size())
            + " values but the hidden size H is " + std::to_string(hiddenSize));
        return false;
    }
    return true;
}

int32_t SteerGatePlugin::getNbOutputs() const noexcept
{
    return 2;
}

int32_t SteerGatePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 2 || !checkInputCount(nbInputs))
    {
        return -1;
    }
    if (!isHiddenType(inputTypes[0]))
    {
        reportError("SteerGate: input 'hidden' must be float32, float16 or bfloat16");
        return -1;
    }
    outputTypes[0] = DataType::kFLOAT; // gate
    outputTypes[1] = DataType::kFLOAT; // score
    return 0;
}

int32_t SteerGatePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbOutputs != 2 || !checkInputCount(nbInputs))
    {
        return -1;
    }
    if (inputs[0].nbDims != 3 || inputs[1].nbDims != 2 || inputs[2].nbDims != 1)
    {
        reportError("SteerGate: expected hidden [B,S,H], attention_mask [B,T] and gate_in [B]");
        return -1;
    }
    if (inputs[0].d[2]->isConstant() && !checkHiddenSize(inputs[0].d[2]->getConstantValue()))
    {
        return -1;
    }
    for (int32_t i = 0; i < 2; ++i)
    {
        outputs[i].nbDims = 1;
        outputs[i].d[0] = inputs[0].d[0];
    }
    return 0;
}

bool SteerGatePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 2 || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isHiddenType(desc.type);
    case 1: return desc.type == DataType::kINT64;
    default: return desc.type == DataType::kFLOAT; // gate_in, [direction, bias,] gate, score
    }
}

int32_t SteerGatePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 2 || !checkInputCount(nbInputs) || in[0].desc.dims.nbDims != 3)
    {
        return -1;
    }
    return checkHiddenSize(in[0].desc.dims.d[2]) ? 0 : -1;
}

int32_t SteerGatePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 2 || !checkInputCount(nbInputs) || !checkHiddenSize(in[0].dims.d[2]))
    {
        return -1;
    }
    return constantsAreInputs() || mDeviceConstants.upload(kName, mDeviceHost) ? 0 : -1;
}

int32_t SteerGatePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    ops::Storage storage;
    if (!storageFor(inputDesc[0].type, storage))
    {
        return -1;
    }
    if (!constantsAreInputs() && !mDeviceConstants.upload(kName, mDeviceHost))
    {
        return -1;
    }
    Dims const& hidden = inputDesc[0].dims;
    int64_t const H = hidden.d[2];
    float const* direction
        = constantsAreInputs() ? static_cast<float const*>(inputs[3]) : mDeviceConstants.data();
    float const* bias = constantsAreInputs() ? static_cast<float const*>(inputs[4]) : mDeviceConstants.data() + H;
    int32_t const status = aligner_kernel_steer_gate(static_cast<int32_t>(storage), inputs[0], hidden.d[0], hidden.d[1],
        H, static_cast<int64_t const*>(inputs[1]), inputDesc[1].dims.d[1], static_cast<float const*>(inputs[2]),
        direction, bias, static_cast<float*>(outputs[0]), static_cast<float*>(outputs[1]), stream);
    if (status != cudaSuccess)
    {
        reportError(std::string("SteerGate: kernel launch failed: ")
            + cudaGetErrorString(static_cast<cudaError_t>(status)));
        return -1;
    }
    return 0;
}

IPluginV3* SteerGatePlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* SteerGatePlugin::getFieldsToSerialize() noexcept
{
    return &mSerialCollection;
}

SteerGatePluginCreator::SteerGatePluginCreator()
{
    mFields.emplace_back("direction", nullptr, PluginFieldType::kFLOAT32, 0);
    mFields.emplace_back("bias", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* SteerGatePluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        if (!checkKnownFields(kName, fc, {"direction", "bias"}))
        {
            return nullptr;
        }
        std::vector<float> direction;
        std::vector<float> bias;
        FieldStatus const directionStatus = readFloatField(kName, fc, "direction", -1, direction);
        FieldStatus const biasStatus = readFloatField(kName, fc, "bias", 1, bias);
        if (directionStatus == FieldStatus::kBad || biasStatus == FieldStatus::kBad)
        {
            return nullptr;
        }
        if (directionStatus != biasStatus)
        {
            char const* missing = directionStatus == FieldStatus::kMissing ? "direction" : "bias";
            reportError(std::string("SteerGate: plugin field '") + missing
                + "' is missing (give both 'direction' and 'bias' as fields, or neither and pass them as inputs 3 "
                  "and 4)");
            return nullptr;
        }
        if (directionStatus == FieldStatus::kMissing)
        {
            return new SteerGatePlugin({}, 0.0f);
        }
        for (float v : direction)
        {
            if (!std::isfinite(v))
            {
                reportError("SteerGate: plugin field 'direction' holds a non-finite value");
                return nullptr;
            }
        }
        if (!std::isfinite(bias[0]))
        {
            reportError("SteerGate: plugin field 'bias' is not finite");
            return nullptr;
        }
        return new SteerGatePlugin(std::move(direction), bias[0]);
    }
    catch (...)
    {
        reportError("SteerGate: out of memory in createPlugin");
        return nullptr;
    }
}

PluginFieldCollection const* SteerGatePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* SteerGatePluginCreator::getPluginName() const noexcept
{
    return kName;
}

char const* SteerGatePluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SteerGatePluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace trt
} // namespace aligner
