#include "steerGatePlugin.h"

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
constexpr char const* kName = contract::kSteerGate;

char const* versionString(int32_t version) noexcept
{
    return version == 1 ? contract::kSteerGateVersion1
                        : (version == 2 ? contract::kSteerGateVersion2 : contract::kSteerGateVersion3);
}

// The weight field is 'direction' in version 1 (the unit SRV) and 'weight' in versions 2 and 3 (§5.1: not unit).
char const* weightField(int32_t version) noexcept
{
    return version == 1 ? "direction" : "weight";
}

std::vector<std::string> knownFields(int32_t version)
{
    if (version == 1)
    {
        return {"direction", "bias"};
    }
    if (version == 2)
    {
        return {"weight", "bias", "tokens", "normalize"};
    }
    return {"weight", "max_weight", "bias", "tokens", "normalize"};
}

constexpr char const* kMaxWeightField = "max_weight";
} // namespace

SteerGatePlugin::SteerGatePlugin(int32_t version, SteerGateConstants constants)
    : mVersion(version)
    , mConstants(std::move(constants))
{
    mSerialFields.emplace_back(weightField(mVersion), mConstants.weight.data(), PluginFieldType::kFLOAT32,
        static_cast<int32_t>(mConstants.weight.size()));
    if (mVersion == 3)
    {
        mSerialFields.emplace_back(kMaxWeightField, mConstants.maxWeight.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mConstants.maxWeight.size()));
    }
    mSerialFields.emplace_back("bias", &mConstants.bias, PluginFieldType::kFLOAT32, 1);
    if (mVersion >= 2)
    {
        mSerialFields.emplace_back("tokens", &mConstants.tokens, PluginFieldType::kINT32, 1);
        mSerialFields.emplace_back("normalize", &mConstants.normalize, PluginFieldType::kINT32, 1);
    }
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
}

std::string SteerGatePlugin::constantsDigest() const
{
    ConstantsDigest digest;
    digest.addFloats(weightField(mVersion), mConstants.weight.data(), mConstants.weight.size());
    digest.addFloats("bias", &mConstants.bias, 1);
    if (mVersion >= 2)
    {
        digest.addInt("tokens", mConstants.tokens);
        digest.addInt("normalize", mConstants.normalize);
    }
    if (mVersion == 3)
    {
        digest.addFloats(kMaxWeightField, mConstants.maxWeight.data(), mConstants.maxWeight.size());
    }
    return digest.hex();
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
        return new SteerGatePlugin(mVersion, mConstants);
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
    return versionString(mVersion);
}

char const* SteerGatePlugin::getPluginNamespace() const noexcept
{
    return contract::kPluginNamespace;
}

bool SteerGatePlugin::checkInputCount(int32_t nbInputs) const noexcept
{
    if (nbInputs != this->nbInputs())
    {
        reportError(std::string("SteerGate version ") + versionString(mVersion) + ": expected "
            + std::to_string(this->nbInputs()) + " inputs ("
            + (mVersion == 1 ? "hidden, attention_mask, gate_in" : "hidden, attention_mask, gate_in, score_in")
            + "), got " + std::to_string(nbInputs));
        return false;
    }
    return true;
}

bool SteerGatePlugin::checkHiddenSize(int64_t hiddenSize) const noexcept
{
    if (hiddenSize >= 0 && hiddenSize != static_cast<int64_t>(mConstants.weight.size()))
    {
        reportError(std::string("SteerGate: plugin field '") + weightField(mVersion) + "' has "
            + std::to_string(mConstants.weight.size()) + " values but the hidden size H is "
            + std::to_string(hiddenSize));
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
    if (inputs[0].nbDims != 3 || inputs[1].nbDims != 2 || inputs[2].nbDims != 1
        || (mVersion >= 2 && inputs[3].nbDims != 1))
    {
        reportError(mVersion == 1
                ? "SteerGate: expected hidden [B,S,H], attention_mask [B,T] and gate_in [B]"
                : "SteerGate: expected hidden [B,S,H], attention_mask [B,T], gate_in [B] and score_in [B]");
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
    if (nbOutputs != 2 || nbInputs != this->nbInputs() || pos < 0 || pos >= nbInputs + nbOutputs)
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
    default: return desc.type == DataType::kFLOAT; // gate_in, [score_in,] gate, score
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
    return mDeviceWeight.upload(kName, mConstants.weight)
            && (mVersion != 3 || mDeviceMaxWeight.upload(kName, mConstants.maxWeight))
        ? 0
        : -1;
}

int32_t SteerGatePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    ops::Storage storage;
    if (!storageFor(inputDesc[0].type, storage) || !mDeviceWeight.upload(kName, mConstants.weight)
        || (mVersion == 3 && !mDeviceMaxWeight.upload(kName, mConstants.maxWeight)))
    {
        return -1;
    }
    Dims const& hidden = inputDesc[0].dims;
    auto const* mask = static_cast<int64_t const*>(inputs[1]);
    auto const* gateIn = static_cast<float const*>(inputs[2]);
    auto* gate = static_cast<float*>(outputs[0]);
    auto* score = static_cast<float*>(outputs[1]);
    int64_t const T = inputDesc[1].dims.d[1];
    int32_t status = cudaSuccess;
    if (mVersion == 1)
    {
        status = aligner_kernel_steer_gate(static_cast<int32_t>(storage), inputs[0], hidden.d[0], hidden.d[1],
            hidden.d[2], mask, T, gateIn, mDeviceWeight.data(), mConstants.bias, gate, score, stream);
    }
    else if (mVersion == 2)
    {
        status = aligner_kernel_steer_gate_v2(static_cast<int32_t>(storage), inputs[0], hidden.d[0], hidden.d[1],
            hidden.d[2], mask, T, gateIn, static_cast<float const*>(inputs[3]), mDeviceWeight.data(), mConstants.bias,
            mConstants.tokens, mConstants.normalize, gate, score, stream);
    }
    else
    {
        status = aligner_kernel_steer_gate_v3(static_cast<int32_t>(storage), inputs[0], hidden.d[0], hidden.d[1],
            hidden.d[2], mask, T, gateIn, static_cast<float const*>(inputs[3]), mDeviceWeight.data(),
            mDeviceMaxWeight.data(), mConstants.bias, mConstants.tokens, mConstants.normalize, gate, score, stream);
    }
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

SteerGatePluginCreator::SteerGatePluginCreator(int32_t version)
    : mVersion(version == 1 ? 1 : (version == 2 ? 2 : 3))
{
    mFields.emplace_back(weightField(mVersion), nullptr, PluginFieldType::kFLOAT32, 0);
    if (mVersion == 3)
    {
        mFields.emplace_back(kMaxWeightField, nullptr, PluginFieldType::kFLOAT32, 0);
    }
    mFields.emplace_back("bias", nullptr, PluginFieldType::kFLOAT32, 1);
    if (mVersion >= 2)
    {
        mFields.emplace_back("tokens", nullptr, PluginFieldType::kINT32, 1);
        mFields.emplace_back("normalize", nullptr, PluginFieldType::kINT32, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* SteerGatePluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    try
    {
        if (!checkKnownFields(kName, fc, knownFields(mVersion)))
        {
            return nullptr;
        }
        SteerGateConstants constants;
        std::vector<float> bias;
        if (!readFloatField(kName, fc, weightField(mVersion), -1, constants.weight)
            || !readFloatField(kName, fc, "bias", 1, bias))
        {
            return nullptr;
        }
        constants.bias = bias[0];
        if (mVersion == 3)
        {
            if (!readFloatField(kName, fc, kMaxWeightField, -1, constants.maxWeight))
            {
                return nullptr;
            }
            if (constants.maxWeight.size() != constants.weight.size())
            {
                reportError("SteerGate: plugin field 'max_weight' has " + std::to_string(constants.maxWeight.size())
                    + " values, 'weight' " + std::to_string(constants.weight.size()));
                return nullptr;
            }
        }
        if (mVersion >= 2)
        {
            if (!readIntField(kName, fc, "tokens", constants.tokens)
                || !readIntField(kName, fc, "normalize", constants.normalize))
            {
                return nullptr;
            }
            if (constants.tokens < 1)
            {
                reportError("SteerGate: plugin field 'tokens' must be >= 1, got " + std::to_string(constants.tokens));
                return nullptr;
            }
            if (constants.normalize != 0 && constants.normalize != 1)
            {
                reportError("SteerGate: plugin field 'normalize' must be 0 or 1, got "
                    + std::to_string(constants.normalize));
                return nullptr;
            }
        }
        std::unique_ptr<SteerGatePlugin> plugin(new SteerGatePlugin(mVersion, std::move(constants)));
        if (phase == TensorRTPhase::kRUNTIME)
        {
            recordConstantsDigest(name, kName, versionString(mVersion), plugin->constantsDigest());
        }
        return plugin.release();
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
    return versionString(mVersion);
}

char const* SteerGatePluginCreator::getPluginNamespace() const noexcept
{
    return contract::kPluginNamespace;
}

} // namespace trt
} // namespace aligner
