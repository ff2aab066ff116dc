#include "pluginUtils.h"

#include <cstdint>
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

namespace
{
nvinfer1::PluginField const* findField(nvinfer1::PluginFieldCollection const* fc, char const* name) noexcept
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, name) == 0)
        {
            return &fc->fields[i];
        }
    }
    return nullptr;
}
} // namespace

bool readFloatField(char const* op, nvinfer1::PluginFieldCollection const* fc, char const* name,
    int32_t expectedLength, std::vector<float>& values) noexcept
{
    std::string const where = std::string(op) + ": plugin field '" + name + "'";
    nvinfer1::PluginField const* field = findField(fc, name);
    if (field == nullptr)
    {
        reportError(where + " is missing");
        return false;
    }
    if (field->type != nvinfer1::PluginFieldType::kFLOAT32)
    {
        reportError(where + " must be float32 (PluginFieldType::kFLOAT32), got type "
            + std::to_string(static_cast<int32_t>(field->type)));
        return false;
    }
    if (field->data == nullptr || field->length < 1)
    {
        reportError(where + " has no data");
        return false;
    }
    if (expectedLength >= 0 && field->length != expectedLength)
    {
        reportError(where + " must hold " + std::to_string(expectedLength) + " value(s), got "
            + std::to_string(field->length));
        return false;
    }
    try
    {
        auto const* begin = static_cast<float const*>(field->data);
        values.assign(begin, begin + field->length);
    }
    catch (...)
    {
        reportError(where + ": out of memory");
        return false;
    }
    for (float v : values)
    {
        if (!ops::isFinite(v))
        {
            reportError(where + " holds a non-finite value");
            return false;
        }
    }
    return true;
}

bool readIntField(char const* op, nvinfer1::PluginFieldCollection const* fc, char const* name, int32_t& value) noexcept
{
    std::string const where = std::string(op) + ": plugin field '" + name + "'";
    nvinfer1::PluginField const* field = findField(fc, name);
    if (field == nullptr)
    {
        reportError(where + " is missing");
        return false;
    }
    if (field->data == nullptr || field->length != 1)
    {
        reportError(where + " must hold exactly one integer");
        return false;
    }
    if (field->type == nvinfer1::PluginFieldType::kINT32)
    {
        value = *static_cast<int32_t const*>(field->data);
        return true;
    }
    if (field->type == nvinfer1::PluginFieldType::kINT64)
    {
        int64_t const wide = *static_cast<int64_t const*>(field->data);
        if (wide < INT32_MIN || wide > INT32_MAX)
        {
            reportError(where + " is out of the int32 range");
            return false;
        }
        value = static_cast<int32_t>(wide);
        return true;
    }
    reportError(where + " must be an integer (PluginFieldType::kINT32), got type "
        + std::to_string(static_cast<int32_t>(field->type)));
    return false;
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
