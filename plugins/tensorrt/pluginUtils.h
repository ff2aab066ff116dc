// Helpers shared by the SteerGate and SteerShift plugins: error reporting through TensorRT's logger, plugin-field
// parsing, the dtype mapping to plugins/common's storage types, and the constants-digest registry (issue 14).
#pragma once

#include "NvInferRuntime.h"
#include "steerContract.h"
#include "steerOps.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aligner
{
namespace trt
{

// Reports an error to TensorRT's logger (Severity::kERROR). Defined by the registration file
// (inferalignerPlugins.cpp) for the plugin libraries, and by the unit harness, which records the messages.
void reportError(std::string const& message) noexcept;

// The storage type that plugins/common uses for a TensorRT data type; false for a type the operators do not take.
bool storageFor(nvinfer1::DataType type, ops::Storage& storage) noexcept;

bool isHiddenType(nvinfer1::DataType type) noexcept;

// A required float32 field of the PluginFieldCollection: false, after reporting an error that names the field, when
// it is absent, has another type, has no data, has a length other than expectedLength (-1: any positive length) or
// holds a non-finite value.
bool readFloatField(char const* op, nvinfer1::PluginFieldCollection const* fc, char const* name,
    int32_t expectedLength, std::vector<float>& values) noexcept;

// A required integer field of length 1: kINT32 (what TensorRT's ONNX parser passes for an INT attribute) or kINT64
// within the int32 range; false, after reporting, otherwise.
bool readIntField(char const* op, nvinfer1::PluginFieldCollection const* fc, char const* name, int32_t& value) noexcept;

// Reports a field that TensorRT passed but the operator does not know, so a typo in an exporter is not ignored.
bool checkKnownFields(char const* op, nvinfer1::PluginFieldCollection const* fc,
    std::vector<std::string> const& known) noexcept;

// Records the constants digest of a plugin created in the runtime phase (deserialised from an engine) in the
// process-wide registry that aligner_plugins_digest_* (pluginDigestRegistry.h) enumerate.
void recordConstantsDigest(char const* name, char const* op, char const* version, std::string const& hex) noexcept;

// Float constants copied to the device once, before the first enqueue. Owned by one plugin object.
class DeviceConstants
{
public:
    DeviceConstants() = default;
    DeviceConstants(DeviceConstants const&) = delete;
    DeviceConstants& operator=(DeviceConstants const&) = delete;
    ~DeviceConstants();
    // Copies host to the device unless already done; false (after reporting) on a CUDA error.
    bool upload(char const* op, std::vector<float> const& host) noexcept;
    float const* data() const noexcept
    {
        return mDevice;
    }

private:
    float* mDevice{nullptr};
};

} // namespace trt
} // namespace aligner
