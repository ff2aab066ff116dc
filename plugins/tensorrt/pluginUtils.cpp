#include "pluginUtils.h"

#include <cstring>

namespace aligner
{
namespace trt
{

bool storageFor(nvinfer1::DataType type, ops::Storage& storage) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: storage = ops::Storage::kFP32; return true;
    case nvinfer1::DataType::kHALF: storage = ops::Storage::kFP16; return true;
    case nvinfer1::DataType::kBF16: storage = ops::Storage::kBF16; return true;
    default: return false;
    }
}

bool isHiddenType(nvinfer1::DataType type) noexcept
{
    ops::Storage unused;
    return storageFor(type, unused);
}

FieldStatus readFloatField(char const* op, nvinfer1::PluginFieldCollection const* fc, char const* name,
    int32_t expectedLength, std::vector<float>& values) noexcept
{
    if (fc == nullptr)
    {
        return FieldStatus::kMissing;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        nvinfer1::PluginField const& field = fc->fields[i];
        if (field.name == nullptr || std::strcmp(field.name, name) != 0)
        {
            continue;
        }
        std::string const where = std::string(op) + ": plugin field '" + name + "'";
        if (field.type != nvinfer1::PluginFieldType::kFLOAT32)
        {
            reportError(where + " must be float32 (PluginFieldType::kFLOAT32), got type "
                + std::to_string(static_cast<int32_t>(field.type)));
            return FieldStatus::kBad;
        }
        if (field.data == nullptr || field.length < 1)
        {
            reportError(where + " has no data");
            return FieldStatus::kBad;
        }
        if (expectedLength >= 0 && field.length != expectedLength)
        {
            reportError(where + " must hold " + std::to_string(expectedLength) + " value(s), got "
                + std::to_string(field.length));
            return FieldStatus::kBad;
        }
        try
        {
            auto const* begin = static_cast<float const*>(field.data);
            values.assign(begin, begin + field.length);
        }
        catch (...)
        {
            reportError(where + ": out of memory");
            return FieldStatus::kBad;
        }
        return FieldStatus::kFound;
    }
    return FieldStatus::kMissing;
}

bool checkKnownFields(char const* op, nvinfer1::PluginFieldCollection const* fc,
    std::vector<std::string> const& known) noexcept
{
    if (fc == nullptr)
    {
        return true;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        char const* name = fc->fields[i].name;
        bool ok = false;
        for (auto const& k : known)
        {
            ok = ok || (name != nullptr && k == name);
        }
        if (!ok)
        {
            reportError(std::string(op) + ": unknown plugin field '" + (name ? name : "(null)") + "'");
            return false;
        }
    }
    return true;
}

DeviceConstants::~DeviceConstants()
{
    if (mDevice != nullptr)
    {
        cudaFree(mDevice);
    }
}

bool DeviceConstants::upload(char const* op, std::vector<float> const& host) noexcept
{
    if (mDevice != nullptr)
    {
        return true;
    }
    size_t const bytes = host.size() * sizeof(float);
    cudaError_t status = cudaMalloc(reinterpret_cast<void**>(&mDevice), bytes);
    if (status == cudaSuccess)
    {
        status = cudaMemcpy(mDevice, host.data(), bytes, cudaMemcpyHostToDevice);
    }
    if (status != cudaSuccess)
    {
        reportError(std::string(op) + ": copying the constants to the device failed: " + cudaGetErrorString(status));
        if (mDevice != nullptr)
        {
            cudaFree(mDevice);
            mDevice = nullptr;
        }
        return false;
    }
    return true;
}

} // namespace trt
} // namespace aligner
