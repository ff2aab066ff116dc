// TensorRT IPluginV3 plugin for SteerShift, versions 1 ("add") and 2 ("norm", issue 17) (docs/contract.md; README.md
// in this folder is its specification). One class serves both: they share the inputs, the output and the one field
// 'vector', and differ only in the kernel.
// Uses IPluginV3OneBuildV2 so that the output may alias the hidden input (in place), which TensorRT honours when the
// builder enables PreviewFeature::kALIASED_PLUGIN_IO_10_03 (present in TensorRT 10.3 and 11.x alike).
#pragma once

#include "NvInferRuntime.h"
#include "pluginUtils.h"

#include <string>
#include <vector>

namespace aligner
{
namespace trt
{

class SteerShiftPlugin : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuildV2,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    // Inputs: hidden, gate.
    static constexpr int32_t kNbInputs = 2;

    // version 1 or 2 (the creator checks it).
    SteerShiftPlugin(int32_t version, std::vector<float> vector);
    ~SteerShiftPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild(V2)
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
    int32_t getAliasedInput(int32_t outputIndex) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    std::vector<float> const& vector() const noexcept
    {
        return mVector;
    }
    int32_t version() const noexcept
    {
        return mVersion;
    }
    // The sha256 of the constants in the canonical form of docs/contract.md (plugins/common/steerDigest.h).
    std::string constantsDigest() const;

private:
    bool checkHiddenSize(int64_t hiddenSize) const noexcept;
    bool checkInputCount(int32_t nbInputs) const noexcept;

    int32_t mVersion;
    std::vector<float> mVector;
    DeviceConstants mDeviceConstants;
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class SteerShiftPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    // One creator per version; both are registered (version 1 stays registered, docs/contract.md).
    explicit SteerShiftPluginCreator(int32_t version);
    ~SteerShiftPluginCreator() override = default;

    // Refuses, naming 'vector': a missing, mistyped, empty or non-finite vector, and an unknown field. In the runtime
    // phase the constants digest is recorded in the registry (pluginDigestRegistry.h).
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
