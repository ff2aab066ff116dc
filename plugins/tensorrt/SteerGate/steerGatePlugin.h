// TensorRT IPluginV3 plugin for SteerGate, versions 1, 2 and 3 (docs/contract.md; README.md in this folder is its
// specification). One class serves every version: they differ in the weight field's name, the fields tokens/normalize
// and the input score_in (versions 2 and 3), the field max_weight (version 3), and share everything else.
#pragma once

#include "NvInferRuntime.h"
#include "pluginUtils.h"

#include <string>
#include <vector>

namespace aligner
{
namespace trt
{

// The constants of a SteerGate node (its plugin fields).
struct SteerGateConstants
{
    std::vector<float> weight; // version 1: the field 'direction'; version 2: 'weight'
    float bias{0.0f};
    int32_t tokens{1};             // versions 2 and 3
    int32_t normalize{0};          // versions 2 and 3
    std::vector<float> maxWeight;  // version 3 only: the field 'max_weight'
};

class SteerGatePlugin : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime
{
public:
    // version 1, 2 or 3 (the creator checks it).
    SteerGatePlugin(int32_t version, SteerGateConstants constants);
    ~SteerGatePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    int32_t version() const noexcept
    {
        return mVersion;
    }
    SteerGateConstants const& constants() const noexcept
    {
        return mConstants;
    }
    // hidden, attention_mask, gate_in (version 1) and score_in (versions 2 and 3).
    int32_t nbInputs() const noexcept
    {
        return mVersion == 1 ? 3 : 4;
    }
    // The sha256 of the constants in the canonical form of docs/contract.md (plugins/common/steerDigest.h).
    std::string constantsDigest() const;

private:
    bool checkInputCount(int32_t nbInputs) const noexcept;
    // H against the weight's length; reports and returns false on a mismatch.
    bool checkHiddenSize(int64_t hiddenSize) const noexcept;

    int32_t mVersion;
    SteerGateConstants mConstants;
    DeviceConstants mDeviceWeight;
    DeviceConstants mDeviceMaxWeight; // version 3
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class SteerGatePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    // One creator per version; all are registered (versions 1 and 2 stay registered, docs/contract.md).
    explicit SteerGatePluginCreator(int32_t version);
    ~SteerGatePluginCreator() override = default;

    // Refuses, with an error naming the field: a missing, mistyped, empty or non-finite weight/bias, a bias of length
    // other than 1, an unknown field, for versions 2 and 3 tokens < 1 or normalize outside {0, 1}, and for version 3
    // a missing or non-finite max_weight or one whose length is not the weight's. In the runtime phase
    // the constants digest is recorded in the registry (pluginDigestRegistry.h).
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    int32_t mVersion;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace trt
} // namespace aligner
