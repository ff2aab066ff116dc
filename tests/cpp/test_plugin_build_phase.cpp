// ctest, no GPU needed: the build-phase logic of the SteerGate and SteerShift TensorRT plugins, against the TensorRT
// headers only. Field parsing and its errors, output types and shapes, format support, and the
// serialise -> deserialise round trip through getFieldsToSerialize and createPlugin(kRUNTIME).
// The harness links no TensorRT library: everything it calls is plugin code in this repository or inline code of the
// TensorRT headers; it supplies reportError() (declared in pluginUtils.h) to record the error messages.
#include "SteerGate/steerGatePlugin.h"
#include "SteerShift/steerShiftPlugin.h"
#include "pluginUtils.h"

#include "NvInferVersion.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;
using aligner::trt::SteerGatePlugin;
using aligner::trt::SteerGatePluginCreator;
using aligner::trt::SteerShiftPlugin;
using aligner::trt::SteerShiftPluginCreator;

namespace
{
std::vector<std::string> gErrors;
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL %s\n", what.c_str());
    }
}

// The last reported error mentions needle (and clears the record).
bool errorMentions(char const* needle)
{
    bool const found = !gErrors.empty() && gErrors.back().find(needle) != std::string::npos;
    if (!found)
    {
        std::printf("  errors so far: %s\n", gErrors.empty() ? "(none)" : gErrors.back().c_str());
    }
    gErrors.clear();
    return found;
}

// A dimension expression implemented the way TensorRT's own are: through the apiv::VDimensionExpr interface.
class FakeDimImpl : public apiv::VDimensionExpr
{
public:
    explicit FakeDimImpl(int64_t value)
        : mValue(value)
    {
    }
    bool isConstant() const override
    {
        return mValue >= 0;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

class FakeDim : public IDimensionExpr
{
public:
    explicit FakeDim(int64_t value) // -1: not a build-time constant
        : mFake(value)
    {
        mImpl = &mFake;
    }
    ~FakeDim() noexcept override = default;

private:
    FakeDimImpl mFake;
};

class FakeExprBuilder : public IExprBuilder
{
public:
    FakeExprBuilder()
    {
        mImpl = nullptr; // the plugins build no new expressions: output dims reuse input dims
    }
    ~FakeExprBuilder() noexcept override = default;
};

DimsExprs exprs(std::vector<IDimensionExpr const*> const& dims)
{
    DimsExprs e{};
    e.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        e.d[i] = dims[i];
    }
    return e;
}

DynamicPluginTensorDesc tensorDesc(DataType type, std::vector<int64_t> const& dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
    }
    return d;
}

PluginFieldCollection collection(std::vector<PluginField> const& fields)
{
    PluginFieldCollection fc{};
    fc.nbFields = static_cast<int32_t>(fields.size());
    fc.fields = fields.data();
    return fc;
}

std::unique_ptr<IPluginV3> create(IPluginCreatorV3One& creator, std::vector<PluginField> const& fields,
    TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    PluginFieldCollection const fc = collection(fields);
    return std::unique_ptr<IPluginV3>(creator.createPlugin("node", &fc, phase));
}

void testSteerGate()
{
    SteerGatePluginCreator creator;
    check(std::strcmp(creator.getPluginName(), "SteerGate") == 0, "SteerGate creator name");
    check(std::strcmp(creator.getPluginNamespace(), "inferaligner") == 0, "SteerGate namespace");
    check(std::strcmp(creator.getPluginVersion(), "1") == 0, "SteerGate version");
    PluginFieldCollection const* names = creator.getFieldNames();
    check(names->nbFields == 2 && std::strcmp(names->fields[0].name, "direction") == 0
            && std::strcmp(names->fields[1].name, "bias") == 0,
        "SteerGate field names (the ONNX parser passes only these attributes)");

    std::vector<float> direction{0.5f, -0.5f, 0.5f, -0.5f};
    float bias = -0.125f;
    double directionF64[4] = {0.5, -0.5, 0.5, -0.5};

    // Mistyped, missing, wrong length, unknown: rejected with the field named.
    check(!create(creator, {{"direction", directionF64, PluginFieldType::kFLOAT64, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate rejects a float64 direction");
    check(errorMentions("'direction'"), "error names 'direction' (type)");
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}}), "SteerGate rejects a missing bias");
    check(errorMentions("'bias'"), "error names 'bias' (missing)");
    float twoBiases[2] = {0.f, 1.f};
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", twoBiases, PluginFieldType::kFLOAT32, 2}}),
        "SteerGate rejects a bias of length 2");
    check(errorMentions("'bias'"), "error names 'bias' (length)");
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}, {"alpha", &bias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate rejects an unknown field");
    check(errorMentions("'alpha'"), "error names the unknown field");

    auto plugin = create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}});
    check(plugin != nullptr, "SteerGate created from fields");
    if (!plugin)
    {
        return;
    }
    auto* gate = static_cast<SteerGatePlugin*>(plugin.get());
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginName(), "SteerGate") == 0 && std::strcmp(core->getPluginNamespace(), "inferaligner") == 0,
        "SteerGate core interface");
    check(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "SteerGate build interface kind");
    check(build->getNbOutputs() == 2, "SteerGate has two outputs");

    // Output types: gate and score are float32 whatever hidden's dtype; int32 hidden is refused.
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType in[3] = {t, DataType::kINT64, DataType::kFLOAT};
        DataType out[2] = {DataType::kINT8, DataType::kINT8};
        check(build->getOutputDataTypes(out, 2, in, 3) == 0 && out[0] == DataType::kFLOAT && out[1] == DataType::kFLOAT,
            "SteerGate output types");
    }
    DataType badIn[3] = {DataType::kINT32, DataType::kINT64, DataType::kFLOAT};
    DataType out2[2];
    check(build->getOutputDataTypes(out2, 2, badIn, 3) != 0, "SteerGate refuses int32 hidden");
    check(errorMentions("hidden"), "error names hidden");

    // Output shapes: [B] twice, from hidden's batch dimension; H checked against direction's length.
    FakeExprBuilder builder;
    FakeDim batch(-1), seq(-1), hidden4(4), hidden5(5), total(-1);
    DimsExprs inputs[3] = {exprs({&batch, &seq, &hidden4}), exprs({&batch, &total}), exprs({&batch})};
    DimsExprs outputs[2];
    check(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 2, builder) == 0, "SteerGate output shapes");
    check(outputs[0].nbDims == 1 && outputs[0].d[0] == &batch && outputs[1].nbDims == 1 && outputs[1].d[0] == &batch,
        "SteerGate outputs are [B]");
    inputs[0] = exprs({&batch, &seq, &hidden5});
    check(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 2, builder) != 0, "SteerGate refuses H != len(direction)");
    check(errorMentions("'direction'"), "H mismatch error names 'direction'");
    check(build->getOutputShapes(inputs, 5, nullptr, 0, outputs, 2, builder) != 0, "SteerGate with fields refuses 5 inputs");
    gErrors.clear();

    // Formats: hidden float/half/bf16, mask int64, everything else float32; linear only.
    DynamicPluginTensorDesc io[5] = {tensorDesc(DataType::kHALF, {2, 3, 4}), tensorDesc(DataType::kINT64, {2, 3}),
        tensorDesc(DataType::kFLOAT, {2}), tensorDesc(DataType::kFLOAT, {2}), tensorDesc(DataType::kFLOAT, {2})};
    for (int pos = 0; pos < 5; ++pos)
    {
        check(build->supportsFormatCombination(pos, io, 3, 2), "SteerGate supports pos " + std::to_string(pos));
    }
    io[1].desc.type = DataType::kINT32;
    check(!build->supportsFormatCombination(1, io, 3, 2), "SteerGate refuses an int32 mask");
    io[3].desc.type = DataType::kHALF;
    check(!build->supportsFormatCombination(3, io, 3, 2), "SteerGate refuses a float16 gate");
    io[0].desc.format = TensorFormat::kHWC8;
    check(!build->supportsFormatCombination(0, io, 3, 2), "SteerGate refuses a non-linear format");

    io[0] = tensorDesc(DataType::kBF16, {2, 3, 4});
    io[1] = tensorDesc(DataType::kINT64, {2, 3});
    check(build->configurePlugin(io, 3, io + 3, 2) == 0, "SteerGate configurePlugin");
    io[0] = tensorDesc(DataType::kBF16, {2, 3, 6});
    check(build->configurePlugin(io, 3, io + 3, 2) != 0 && errorMentions("'direction'"), "configurePlugin checks H");

    // Round trip: the serialised fields recreate an identical plugin in the runtime phase.
    PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
    std::vector<PluginField> fields(serial->fields, serial->fields + serial->nbFields);
    auto restored = create(creator, fields, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "SteerGate deserialises");
    if (restored)
    {
        auto* back = static_cast<SteerGatePlugin*>(restored.get());
        check(back->direction() == gate->direction() && back->bias() == gate->bias(), "SteerGate round trip keeps the constants");
    }
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && static_cast<SteerGatePlugin*>(cloned.get())->direction() == direction, "SteerGate clone");

    // Constants as initializer inputs 3 and 4: no fields, five inputs, nothing serialised.
    auto fromInputs = create(creator, {});
    check(fromInputs != nullptr, "SteerGate without fields (constants as inputs)");
    if (fromInputs)
    {
        auto* b2 = static_cast<IPluginV3OneBuild*>(fromInputs->getCapabilityInterface(PluginCapabilityType::kBUILD));
        DimsExprs in5[5] = {exprs({&batch, &seq, &hidden5}), exprs({&batch, &total}), exprs({&batch}), exprs({&hidden5}), exprs({})};
        check(b2->getOutputShapes(in5, 5, nullptr, 0, outputs, 2, builder) == 0, "SteerGate with constant inputs: 5 inputs");
        check(b2->getOutputShapes(in5, 3, nullptr, 0, outputs, 2, builder) != 0 && errorMentions("inputs 3 and 4"),
            "SteerGate with constant inputs refuses 3 inputs");
        auto* r2 = static_cast<IPluginV3OneRuntime*>(fromInputs->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(r2->getFieldsToSerialize()->nbFields == 0, "SteerGate with constant inputs serialises no fields");
    }
}

void testSteerShift()
{
    SteerShiftPluginCreator creator;
    check(std::strcmp(creator.getPluginName(), "SteerShift") == 0, "SteerShift creator name");
    PluginFieldCollection const* names = creator.getFieldNames();
    check(names->nbFields == 1 && std::strcmp(names->fields[0].name, "vector") == 0, "SteerShift field names");

    std::vector<float> vector{1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};
    std::vector<int32_t> vectorI32(7, 1);
    check(!create(creator, {{"vector", vectorI32.data(), PluginFieldType::kINT32, 7}}), "SteerShift rejects an int32 vector");
    check(errorMentions("'vector'"), "error names 'vector' (type)");
    check(!create(creator, {{"vector", nullptr, PluginFieldType::kFLOAT32, 0}}), "SteerShift rejects an empty vector");
    check(errorMentions("'vector'"), "error names 'vector' (empty)");

    auto plugin = create(creator, {{"vector", vector.data(), PluginFieldType::kFLOAT32, 7}});
    check(plugin != nullptr, "SteerShift created from fields");
    if (!plugin)
    {
        return;
    }
    auto* build = static_cast<IPluginV3OneBuildV2*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    InterfaceInfo const info = build->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN_V3ONE_BUILD") == 0 && info.major == 2, "SteerShift exposes IPluginV3OneBuildV2");
    check(build->getAliasedInput(0) == 0 && build->getAliasedInput(1) == -1, "SteerShift output 0 may alias hidden");
    check(build->getNbOutputs() == 1, "SteerShift has one output");

    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType in[2] = {t, DataType::kFLOAT};
        DataType out = DataType::kINT8;
        check(build->getOutputDataTypes(&out, 1, in, 2) == 0 && out == t, "SteerShift output has hidden's dtype");
    }

    FakeExprBuilder builder;
    FakeDim batch(-1), seq(-1), hidden7(7), hidden8(8);
    DimsExprs inputs[2] = {exprs({&batch, &seq, &hidden7}), exprs({&batch})};
    DimsExprs output;
    check(build->getOutputShapes(inputs, 2, nullptr, 0, &output, 1, builder) == 0 && output.nbDims == 3
            && output.d[0] == &batch && output.d[1] == &seq && output.d[2] == &hidden7,
        "SteerShift output shape is hidden's");
    inputs[0] = exprs({&batch, &seq, &hidden8});
    check(build->getOutputShapes(inputs, 2, nullptr, 0, &output, 1, builder) != 0 && errorMentions("'vector'"),
        "SteerShift refuses H != len(vector), naming 'vector'");

    DynamicPluginTensorDesc io[3] = {tensorDesc(DataType::kBF16, {2, 3, 7}), tensorDesc(DataType::kFLOAT, {2}),
        tensorDesc(DataType::kBF16, {2, 3, 7})};
    check(build->supportsFormatCombination(0, io, 2, 1) && build->supportsFormatCombination(1, io, 2, 1)
            && build->supportsFormatCombination(2, io, 2, 1),
        "SteerShift supports bf16 in and out");
    io[2].desc.type = DataType::kHALF;
    check(!build->supportsFormatCombination(2, io, 2, 1), "SteerShift refuses an output dtype other than hidden's");
    io[1].desc.type = DataType::kHALF;
    check(!build->supportsFormatCombination(1, io, 2, 1), "SteerShift refuses a float16 gate");

    PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
    std::vector<PluginField> fields(serial->fields, serial->fields + serial->nbFields);
    auto restored = create(creator, fields, TensorRTPhase::kRUNTIME);
    check(restored && static_cast<SteerShiftPlugin*>(restored.get())->vector() == vector, "SteerShift round trip");

    auto fromInputs = create(creator, {});
    check(fromInputs && static_cast<SteerShiftPlugin*>(fromInputs.get())->constantsAreInputs(),
        "SteerShift without a field takes the vector as input 2");
    if (fromInputs)
    {
        auto* b2 = static_cast<IPluginV3OneBuild*>(fromInputs->getCapabilityInterface(PluginCapabilityType::kBUILD));
        DimsExprs in3[3] = {exprs({&batch, &seq, &hidden8}), exprs({&batch}), exprs({&hidden8})};
        check(b2->getOutputShapes(in3, 3, nullptr, 0, &output, 1, builder) == 0, "SteerShift with vector input");
        check(b2->getOutputShapes(in3, 2, nullptr, 0, &output, 1, builder) != 0 && errorMentions("'vector'"),
            "SteerShift without the field refuses 2 inputs, naming 'vector'");
    }
}
} // namespace

namespace aligner
{
namespace trt
{
void reportError(std::string const& message) noexcept
{
    gErrors.push_back(message);
}
} // namespace trt
} // namespace aligner

int main()
{
    std::printf("TensorRT headers %d.%d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH);
    testSteerGate();
    testSteerShift();
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
