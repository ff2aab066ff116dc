// ctest, no GPU needed: the build-phase logic of the SteerGate (versions 1, 2 and 3) and SteerShift TensorRT plugins,
// against the TensorRT headers only. Field parsing and its errors, output types and shapes, format support, the
// serialise -> deserialise round trip through getFieldsToSerialize and createPlugin(kRUNTIME), and the constants-digest
// registry that runtime-phase creation fills.
// The harness links no TensorRT library: everything it calls is plugin code in this repository or inline code of the
// TensorRT headers; it supplies reportError() (declared in pluginUtils.h) to record the error messages.
#include "SteerGate/steerGatePlugin.h"
#include "SteerShift/steerShiftPlugin.h"
#include "pluginDigestRegistry.h"
#include "pluginUtils.h"

#include "NvInferVersion.h"

#include <cstdio>
#include <cstring>
#include <limits>
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

void testSteerGateV1()
{
    SteerGatePluginCreator creator{1};
    check(std::strcmp(creator.getPluginName(), "SteerGate") == 0, "SteerGate creator name");
    check(std::strcmp(creator.getPluginNamespace(), "inferaligner") == 0, "SteerGate namespace");
    check(std::strcmp(creator.getPluginVersion(), "1") == 0, "SteerGate version 1");
    PluginFieldCollection const* names = creator.getFieldNames();
    check(names->nbFields == 2 && std::strcmp(names->fields[0].name, "direction") == 0
            && std::strcmp(names->fields[1].name, "bias") == 0,
        "SteerGate v1 field names (the ONNX parser passes only these attributes)");

    std::vector<float> direction{0.5f, -0.5f, 0.5f, -0.5f};
    float bias = -0.125f;
    double directionF64[4] = {0.5, -0.5, 0.5, -0.5};

    // Mistyped, missing, wrong length, non-finite, unknown: refused with the field named.
    check(!create(creator, {{"direction", directionF64, PluginFieldType::kFLOAT64, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate rejects a float64 direction");
    check(errorMentions("'direction'"), "error names 'direction' (type)");
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}}), "SteerGate rejects a missing bias");
    check(errorMentions("'bias'"), "error names 'bias' (missing)");
    check(!create(creator, {{"bias", &bias, PluginFieldType::kFLOAT32, 1}}), "SteerGate rejects a missing direction");
    check(errorMentions("'direction'"), "error names 'direction' (missing)");
    check(!create(creator, {}), "SteerGate without fields is refused (constants are never graph inputs)");
    check(errorMentions("'direction'"), "error names 'direction' (no fields)");
    float twoBiases[2] = {0.f, 1.f};
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", twoBiases, PluginFieldType::kFLOAT32, 2}}),
        "SteerGate rejects a bias of length 2");
    check(errorMentions("'bias'"), "error names 'bias' (length)");
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}, {"alpha", &bias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate rejects an unknown field");
    check(errorMentions("'alpha'"), "error names the unknown field");
    check(!create(creator, {{"weight", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate v1 refuses the v2 field 'weight'");
    check(errorMentions("'weight'"), "error names 'weight' (unknown in v1)");
    std::vector<float> withNan = direction;
    withNan[2] = std::numeric_limits<float>::quiet_NaN();
    check(!create(creator, {{"direction", withNan.data(), PluginFieldType::kFLOAT32, 4}, {"bias", &bias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate rejects a NaN in direction");
    check(errorMentions("'direction'"), "error names 'direction' (non-finite)");
    float infBias = std::numeric_limits<float>::infinity();
    check(!create(creator, {{"direction", direction.data(), PluginFieldType::kFLOAT32, 4}, {"bias", &infBias, PluginFieldType::kFLOAT32, 1}}),
        "SteerGate rejects an infinite bias");
    check(errorMentions("'bias'"), "error names 'bias' (non-finite)");

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
    check(std::strcmp(core->getPluginName(), "SteerGate") == 0 && std::strcmp(core->getPluginNamespace(), "inferaligner") == 0
            && std::strcmp(core->getPluginVersion(), "1") == 0,
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
    DimsExprs inputs[4] = {exprs({&batch, &seq, &hidden4}), exprs({&batch, &total}), exprs({&batch}), exprs({&batch})};
    DimsExprs outputs[2];
    check(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 2, builder) == 0, "SteerGate output shapes");
    check(outputs[0].nbDims == 1 && outputs[0].d[0] == &batch && outputs[1].nbDims == 1 && outputs[1].d[0] == &batch,
        "SteerGate outputs are [B]");
    check(build->getOutputShapes(inputs, 4, nullptr, 0, outputs, 2, builder) != 0 && errorMentions("expected 3 inputs"),
        "SteerGate v1 refuses a fourth input");
    inputs[0] = exprs({&batch, &seq, &hidden5});
    check(build->getOutputShapes(inputs, 3, nullptr, 0, outputs, 2, builder) != 0, "SteerGate refuses H != len(direction)");
    check(errorMentions("'direction'"), "H mismatch error names 'direction'");

    // Formats: hidden float/half/bf16, mask int64, everything else float32; linear only.
    DynamicPluginTensorDesc io[5] = {tensorDesc(DataType::kHALF, {2, 3, 4}), tensorDesc(DataType::kINT64, {2, 3}),
        tensorDesc(DataType::kFLOAT, {2}), tensorDesc(DataType::kFLOAT, {2}), tensorDesc(DataType::kFLOAT, {2})};
    for (int pos = 0; pos < 5; ++pos)
    {
        check(build->supportsFormatCombination(pos, io, 3, 2), "SteerGate supports pos " + std::to_string(pos));
    }
    check(!build->supportsFormatCombination(0, io, 4, 2), "SteerGate v1 supports no fourth input");
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
    check(serial->nbFields == 2, "SteerGate v1 serialises direction and bias");
    std::vector<PluginField> fields(serial->fields, serial->fields + serial->nbFields);
    auto restored = create(creator, fields, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "SteerGate deserialises");
    if (restored)
    {
        auto* back = static_cast<SteerGatePlugin*>(restored.get());
        check(back->constants().weight == gate->constants().weight && back->constants().bias == gate->constants().bias
                && back->version() == 1,
            "SteerGate round trip keeps the constants");
    }
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && static_cast<SteerGatePlugin*>(cloned.get())->constants().weight == direction, "SteerGate clone");
}

void testSteerGateV2()
{
    SteerGatePluginCreator creator{2};
    check(std::strcmp(creator.getPluginName(), "SteerGate") == 0 && std::strcmp(creator.getPluginVersion(), "2") == 0
            && std::strcmp(creator.getPluginNamespace(), "inferaligner") == 0,
        "SteerGate version 2 creator");
    PluginFieldCollection const* names = creator.getFieldNames();
    check(names->nbFields == 4 && std::strcmp(names->fields[0].name, "weight") == 0
            && std::strcmp(names->fields[1].name, "bias") == 0 && std::strcmp(names->fields[2].name, "tokens") == 0
            && names->fields[2].type == PluginFieldType::kINT32 && std::strcmp(names->fields[3].name, "normalize") == 0
            && names->fields[3].type == PluginFieldType::kINT32,
        "SteerGate v2 field names and types");

    std::vector<float> weight{0.5f, -1.0f, 2.0f};
    float bias = 0.75f;
    int32_t tokens = 3, normalize = 1;
    auto fieldsWith = [&](int32_t const* tokensValue, int32_t const* normalizeValue) {
        return std::vector<PluginField>{{"weight", weight.data(), PluginFieldType::kFLOAT32, 3},
            {"bias", &bias, PluginFieldType::kFLOAT32, 1}, {"tokens", tokensValue, PluginFieldType::kINT32, 1},
            {"normalize", normalizeValue, PluginFieldType::kINT32, 1}};
    };

    // Refusals, each naming the field.
    int32_t zero = 0, minusOne = -1, two = 2, one = 1;
    check(!create(creator, fieldsWith(&zero, &one)) && errorMentions("'tokens'"), "SteerGate v2 refuses tokens = 0");
    check(!create(creator, fieldsWith(&minusOne, &one)) && errorMentions("'tokens'"), "SteerGate v2 refuses tokens = -1");
    check(!create(creator, fieldsWith(&tokens, &two)) && errorMentions("'normalize'"), "SteerGate v2 refuses normalize = 2");
    check(!create(creator, fieldsWith(&tokens, &minusOne)) && errorMentions("'normalize'"),
        "SteerGate v2 refuses normalize = -1");
    float tokensAsFloat = 3.0f;
    check(!create(creator, {{"weight", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
              {"tokens", &tokensAsFloat, PluginFieldType::kFLOAT32, 1}, {"normalize", &normalize, PluginFieldType::kINT32, 1}})
            && errorMentions("'tokens'"),
        "SteerGate v2 refuses a float tokens");
    int32_t twoTokens[2] = {1, 2};
    check(!create(creator, {{"weight", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
              {"tokens", twoTokens, PluginFieldType::kINT32, 2}, {"normalize", &normalize, PluginFieldType::kINT32, 1}})
            && errorMentions("'tokens'"),
        "SteerGate v2 refuses two tokens values");
    check(!create(creator, {{"weight", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
              {"normalize", &normalize, PluginFieldType::kINT32, 1}})
            && errorMentions("'tokens'"),
        "SteerGate v2 refuses a missing tokens");
    check(!create(creator, {{"weight", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
              {"tokens", &tokens, PluginFieldType::kINT32, 1}})
            && errorMentions("'normalize'"),
        "SteerGate v2 refuses a missing normalize");
    std::vector<float> infWeight = weight;
    infWeight[0] = -std::numeric_limits<float>::infinity();
    check(!create(creator, {{"weight", infWeight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
              {"tokens", &tokens, PluginFieldType::kINT32, 1}, {"normalize", &normalize, PluginFieldType::kINT32, 1}})
            && errorMentions("'weight'"),
        "SteerGate v2 refuses a non-finite weight");
    float nanBias = std::numeric_limits<float>::quiet_NaN();
    check(!create(creator, {{"weight", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &nanBias, PluginFieldType::kFLOAT32, 1},
              {"tokens", &tokens, PluginFieldType::kINT32, 1}, {"normalize", &normalize, PluginFieldType::kINT32, 1}})
            && errorMentions("'bias'"),
        "SteerGate v2 refuses a NaN bias");
    check(!create(creator, {{"direction", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
              {"tokens", &tokens, PluginFieldType::kINT32, 1}, {"normalize", &normalize, PluginFieldType::kINT32, 1}})
            && errorMentions("'direction'"),
        "SteerGate v2 refuses the v1 field 'direction'");
    int64_t tokens64 = 3;
    auto wide = create(creator, {{"weight", weight.data(), PluginFieldType::kFLOAT32, 3}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
        {"tokens", &tokens64, PluginFieldType::kINT64, 1}, {"normalize", &normalize, PluginFieldType::kINT32, 1}});
    check(wide && static_cast<SteerGatePlugin*>(wide.get())->constants().tokens == 3, "SteerGate v2 takes an int64 tokens");

    auto plugin = create(creator, fieldsWith(&tokens, &normalize));
    check(plugin != nullptr, "SteerGate v2 created from fields");
    if (!plugin)
    {
        return;
    }
    auto* gate = static_cast<SteerGatePlugin*>(plugin.get());
    check(gate->version() == 2 && gate->nbInputs() == 4 && gate->constants().tokens == 3
            && gate->constants().normalize == 1 && gate->constants().bias == 0.75f && gate->constants().weight == weight,
        "SteerGate v2 constants");
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginVersion(), "2") == 0, "SteerGate v2 plugin version");

    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType in[4] = {t, DataType::kINT64, DataType::kFLOAT, DataType::kFLOAT};
        DataType out[2] = {DataType::kINT8, DataType::kINT8};
        check(build->getOutputDataTypes(out, 2, in, 4) == 0 && out[0] == DataType::kFLOAT && out[1] == DataType::kFLOAT,
            "SteerGate v2 output types");
    }
    DataType three[3] = {DataType::kFLOAT, DataType::kINT64, DataType::kFLOAT};
    DataType out2[2];
    check(build->getOutputDataTypes(out2, 2, three, 3) != 0 && errorMentions("score_in"),
        "SteerGate v2 refuses three inputs, naming score_in");

    FakeExprBuilder builder;
    FakeDim batch(-1), seq(-1), hidden3(3), hidden4(4), total(-1);
    DimsExprs inputs[4] = {exprs({&batch, &seq, &hidden3}), exprs({&batch, &total}), exprs({&batch}), exprs({&batch})};
    DimsExprs outputs[2];
    check(build->getOutputShapes(inputs, 4, nullptr, 0, outputs, 2, builder) == 0 && outputs[0].nbDims == 1
            && outputs[0].d[0] == &batch && outputs[1].d[0] == &batch,
        "SteerGate v2 outputs are [B]");
    inputs[3] = exprs({&batch, &seq});
    check(build->getOutputShapes(inputs, 4, nullptr, 0, outputs, 2, builder) != 0 && errorMentions("score_in [B]"),
        "SteerGate v2 refuses a score_in of rank 2");
    inputs[3] = exprs({&batch});
    inputs[0] = exprs({&batch, &seq, &hidden4});
    check(build->getOutputShapes(inputs, 4, nullptr, 0, outputs, 2, builder) != 0 && errorMentions("'weight'"),
        "SteerGate v2 refuses H != len(weight), naming 'weight'");

    DynamicPluginTensorDesc io[6] = {tensorDesc(DataType::kFLOAT, {2, 5, 3}), tensorDesc(DataType::kINT64, {2, 7}),
        tensorDesc(DataType::kFLOAT, {2}), tensorDesc(DataType::kFLOAT, {2}), tensorDesc(DataType::kFLOAT, {2}),
        tensorDesc(DataType::kFLOAT, {2})};
    for (int pos = 0; pos < 6; ++pos)
    {
        check(build->supportsFormatCombination(pos, io, 4, 2), "SteerGate v2 supports pos " + std::to_string(pos));
    }
    io[3].desc.type = DataType::kHALF;
    check(!build->supportsFormatCombination(3, io, 4, 2), "SteerGate v2 refuses a float16 score_in");
    io[3].desc.type = DataType::kFLOAT;
    check(build->configurePlugin(io, 4, io + 4, 2) == 0, "SteerGate v2 configurePlugin");
    io[0] = tensorDesc(DataType::kFLOAT, {2, 5, 8});
    check(build->configurePlugin(io, 4, io + 4, 2) != 0 && errorMentions("'weight'"), "SteerGate v2 configurePlugin checks H");

    // Round trip: all four fields, the ints as kINT32, recreate the plugin in the runtime phase.
    PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
    check(serial->nbFields == 4, "SteerGate v2 serialises four fields");
    for (int32_t i = 0; i < serial->nbFields; ++i)
    {
        bool const isInt = std::strcmp(serial->fields[i].name, "tokens") == 0
            || std::strcmp(serial->fields[i].name, "normalize") == 0;
        check(serial->fields[i].type == (isInt ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32),
            std::string("serialised type of ") + serial->fields[i].name);
    }
    std::vector<PluginField> fields(serial->fields, serial->fields + serial->nbFields);
    auto restored = create(creator, fields, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "SteerGate v2 deserialises");
    if (restored)
    {
        auto const& back = static_cast<SteerGatePlugin*>(restored.get())->constants();
        check(back.weight == weight && back.bias == bias && back.tokens == 3 && back.normalize == 1,
            "SteerGate v2 round trip keeps the constants");
    }
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && static_cast<SteerGatePlugin*>(cloned.get())->version() == 2
            && static_cast<SteerGatePlugin*>(cloned.get())->constants().tokens == 3,
        "SteerGate v2 clone");
}

// Versions 1 ("add") and 2 ("norm") share the interface: every check holds for both.
void testSteerShift(int32_t version)
{
    SteerShiftPluginCreator creator{version};
    std::string const expectVersion = std::to_string(version);
    check(std::strcmp(creator.getPluginName(), "SteerShift") == 0, "SteerShift creator name");
    check(creator.getPluginVersion() == expectVersion, "SteerShift creator version " + expectVersion);
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
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(core->getPluginVersion() == expectVersion && static_cast<SteerShiftPlugin*>(plugin.get())->version() == version,
        "SteerShift plugin version " + expectVersion);
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
    check(restored && static_cast<SteerShiftPlugin*>(restored.get())->vector() == vector
            && static_cast<SteerShiftPlugin*>(restored.get())->version() == version,
        "SteerShift round trip");
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && static_cast<SteerShiftPlugin*>(cloned.get())->version() == version, "SteerShift clone keeps its version");

    check(!create(creator, {}) && errorMentions("'vector'"), "SteerShift without the field is refused, naming 'vector'");
    std::vector<float> withInf = vector;
    withInf[3] = std::numeric_limits<float>::infinity();
    check(!create(creator, {{"vector", withInf.data(), PluginFieldType::kFLOAT32, 7}}) && errorMentions("'vector'"),
        "SteerShift refuses a non-finite vector");
    DimsExprs in3[3] = {exprs({&batch, &seq, &hidden7}), exprs({&batch}), exprs({&hidden7})};
    check(build->getOutputShapes(in3, 3, nullptr, 0, &output, 1, builder) != 0 && errorMentions("expected 2 inputs"),
        "SteerShift refuses a third input");
}

// Version 3 (issue 18): version 2's fields plus max_weight, the same inputs; what is new is checked here.
void testSteerGateV3()
{
    SteerGatePluginCreator creator{3};
    check(std::strcmp(creator.getPluginName(), "SteerGate") == 0 && std::strcmp(creator.getPluginVersion(), "3") == 0
            && std::strcmp(creator.getPluginNamespace(), "inferaligner") == 0,
        "SteerGate version 3 creator");
    PluginFieldCollection const* names = creator.getFieldNames();
    check(names->nbFields == 5 && std::strcmp(names->fields[0].name, "weight") == 0
            && std::strcmp(names->fields[1].name, "max_weight") == 0
            && names->fields[1].type == PluginFieldType::kFLOAT32 && std::strcmp(names->fields[2].name, "bias") == 0
            && std::strcmp(names->fields[3].name, "tokens") == 0 && std::strcmp(names->fields[4].name, "normalize") == 0,
        "SteerGate v3 field names and types");

    std::vector<float> weight{0.5f, -1.0f, 2.0f};
    std::vector<float> maxWeight{0.25f, -0.5f, 1.0f};
    float bias = 0.75f;
    int32_t tokens = 3, normalize = 1;
    auto fieldsWith = [&](float const* maxValues, int32_t maxLength) {
        return std::vector<PluginField>{{"weight", weight.data(), PluginFieldType::kFLOAT32, 3},
            {"max_weight", maxValues, PluginFieldType::kFLOAT32, maxLength}, {"bias", &bias, PluginFieldType::kFLOAT32, 1},
            {"tokens", &tokens, PluginFieldType::kINT32, 1}, {"normalize", &normalize, PluginFieldType::kINT32, 1}};
    };
    std::vector<PluginField> withoutMax = fieldsWith(maxWeight.data(), 3);
    withoutMax.erase(withoutMax.begin() + 1);
    check(!create(creator, withoutMax) && errorMentions("'max_weight'"), "SteerGate v3 refuses a missing max_weight");
    check(!create(creator, fieldsWith(maxWeight.data(), 2)) && errorMentions("'max_weight'"),
        "SteerGate v3 refuses a max_weight of another length than weight");
    std::vector<float> nanMax = maxWeight;
    nanMax[1] = std::numeric_limits<float>::quiet_NaN();
    check(!create(creator, fieldsWith(nanMax.data(), 3)) && errorMentions("'max_weight'"),
        "SteerGate v3 refuses a non-finite max_weight");
    SteerGatePluginCreator v2{2};
    check(!create(v2, fieldsWith(maxWeight.data(), 3)) && errorMentions("'max_weight'"),
        "SteerGate v2 refuses the v3 field 'max_weight'");

    auto plugin = create(creator, fieldsWith(maxWeight.data(), 3));
    check(plugin != nullptr, "SteerGate v3 created from fields");
    if (!plugin)
    {
        return;
    }
    auto* gate = static_cast<SteerGatePlugin*>(plugin.get());
    check(gate->version() == 3 && gate->nbInputs() == 4 && gate->constants().maxWeight == maxWeight
            && gate->constants().weight == weight && gate->constants().tokens == 3,
        "SteerGate v3 constants");
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(core->getPluginVersion(), "3") == 0, "SteerGate v3 plugin version");
    DataType three[3] = {DataType::kFLOAT, DataType::kINT64, DataType::kFLOAT};
    DataType out2[2];
    check(build->getOutputDataTypes(out2, 2, three, 3) != 0 && errorMentions("score_in"),
        "SteerGate v3 refuses three inputs, naming score_in");
    FakeExprBuilder builder;
    FakeDim batch(-1), seq(-1), hidden3(3), total(-1);
    DimsExprs inputs[4] = {exprs({&batch, &seq, &hidden3}), exprs({&batch, &total}), exprs({&batch}), exprs({&batch})};
    DimsExprs outputs[2];
    check(build->getOutputShapes(inputs, 4, nullptr, 0, outputs, 2, builder) == 0 && outputs[0].d[0] == &batch,
        "SteerGate v3 outputs are [B]");

    PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
    check(serial->nbFields == 5, "SteerGate v3 serialises five fields");
    std::vector<PluginField> fields(serial->fields, serial->fields + serial->nbFields);
    auto restored = create(creator, fields, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "SteerGate v3 deserialises");
    if (restored)
    {
        auto const& back = static_cast<SteerGatePlugin*>(restored.get())->constants();
        check(back.weight == weight && back.maxWeight == maxWeight && back.bias == bias && back.tokens == 3
                && back.normalize == 1,
            "SteerGate v3 round trip keeps the constants");
    }
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned && static_cast<SteerGatePlugin*>(cloned.get())->version() == 3
            && static_cast<SteerGatePlugin*>(cloned.get())->constants().maxWeight == maxWeight,
        "SteerGate v3 clone");
    // The digest of docs/contract.md over the five fields (expected value from aligner_runtime.integrity's
    // constants_digest, an independent implementation, of the same attributes).
    check(gate->constantsDigest() == "f946f1c468765f3981916223f131c7dbafdca1a5b02a18f1615bfda06fe0c382",
        "SteerGate v3 constants digest");
}

// The registry of constants digests: nothing in the build phase; one entry per plugin created in the runtime phase,
// with the digest of docs/contract.md (the expected values computed independently, see tests/cpp/
// test_steer_contract.cpp).
void testDigestRegistry()
{
    aligner_plugins_digest_reset();
    check(aligner_plugins_digest_count() == 0, "registry empty after reset");

    SteerGatePluginCreator gateV1{1};
    SteerGatePluginCreator gateV2{2};
    SteerShiftPluginCreator shift{1};
    SteerShiftPluginCreator shiftV2{2};
    std::vector<float> direction{0.6f, 0.8f};
    float biasV1 = -0.25f;
    std::vector<float> weight{0.5f, -1.0f, 2.0f};
    float biasV2 = 0.75f;
    int32_t tokens = 3, normalize = 1;
    std::vector<float> vector{1.0f, -2.5f, 0.125f};
    std::vector<PluginField> const v1Fields{{"direction", direction.data(), PluginFieldType::kFLOAT32, 2},
        {"bias", &biasV1, PluginFieldType::kFLOAT32, 1}};
    std::vector<PluginField> const v2Fields{{"weight", weight.data(), PluginFieldType::kFLOAT32, 3},
        {"bias", &biasV2, PluginFieldType::kFLOAT32, 1}, {"tokens", &tokens, PluginFieldType::kINT32, 1},
        {"normalize", &normalize, PluginFieldType::kINT32, 1}};
    std::vector<PluginField> const shiftFields{{"vector", vector.data(), PluginFieldType::kFLOAT32, 3}};

    auto built = create(gateV1, v1Fields, TensorRTPhase::kBUILD);
    check(built && aligner_plugins_digest_count() == 0, "the build phase records nothing");

    PluginFieldCollection fc1 = collection(v1Fields), fc2 = collection(v2Fields), fc3 = collection(shiftFields);
    std::unique_ptr<IPluginV3> a(gateV1.createPlugin("/model/layers.4/steer/SteerGate", &fc1, TensorRTPhase::kRUNTIME));
    std::unique_ptr<IPluginV3> b(gateV2.createPlugin("/model/layers.6/steer/SteerGate", &fc2, TensorRTPhase::kRUNTIME));
    std::unique_ptr<IPluginV3> c(shift.createPlugin("/model/layers.2/steer/SteerShift", &fc3, TensorRTPhase::kRUNTIME));
    std::unique_ptr<IPluginV3> d(shiftV2.createPlugin("/model/layers.3/steer/SteerShift", &fc3, TensorRTPhase::kRUNTIME));
    check(a && b && c && d, "runtime-phase plugins created");
    check(aligner_plugins_digest_count() == 4, "four entries");
    struct Want
    {
        char const* name;
        char const* op;
        char const* version;
        char const* hex;
    };
    // SteerShift version 2 digests its one field 'vector' as version 1 does (the version is recorded beside it).
    Want const wants[4] = {{"/model/layers.4/steer/SteerGate", "SteerGate", "1",
                               "b0057596c32d442b0a130e9e40d267154855fa87ff9fe118f853a3c27c0983a7"},
        {"/model/layers.6/steer/SteerGate", "SteerGate", "2",
            "66cebb332c45ba8f535373ef10ebb5ade244571eac75e6dfec51177c490e94e2"},
        {"/model/layers.2/steer/SteerShift", "SteerShift", "1",
            "69f4dda777635309aec90b8413590655b5779c987749d1f003350241300ed52a"},
        {"/model/layers.3/steer/SteerShift", "SteerShift", "2",
            "69f4dda777635309aec90b8413590655b5779c987749d1f003350241300ed52a"}};
    for (int32_t i = 0; i < 4; ++i)
    {
        char const *name = nullptr, *op = nullptr, *version = nullptr, *hex = nullptr;
        check(aligner_plugins_digest_at(i, &name, &op, &version, &hex) == 0, "entry " + std::to_string(i));
        check(name && std::strcmp(name, wants[i].name) == 0 && std::strcmp(op, wants[i].op) == 0
                && std::strcmp(version, wants[i].version) == 0 && std::strcmp(hex, wants[i].hex) == 0,
            std::string("registry entry for ") + wants[i].name + " (got " + (hex ? hex : "(null)") + ")");
    }
    check(static_cast<SteerGatePlugin*>(a.get())->constantsDigest() == wants[0].hex, "v1 plugin's own digest");
    char const *name = nullptr, *op = nullptr, *version = nullptr, *hex = nullptr;
    check(aligner_plugins_digest_at(4, &name, &op, &version, &hex) == -1, "index out of range refused");
    check(aligner_plugins_digest_at(0, nullptr, &op, &version, &hex) == -1, "NULL pointer refused");
    // A refused plugin records nothing; a clone (attachToContext) records nothing.
    std::vector<PluginField> const badShift{{"vector", nullptr, PluginFieldType::kFLOAT32, 0}};
    PluginFieldCollection bad = collection(badShift);
    check(shift.createPlugin("/model/layers.9/steer/SteerShift", &bad, TensorRTPhase::kRUNTIME) == nullptr,
        "refused in the runtime phase");
    gErrors.clear();
    std::unique_ptr<IPluginV3> cloned(c->clone());
    check(aligner_plugins_digest_count() == 4, "refusals and clones record nothing");
    aligner_plugins_digest_reset();
    check(aligner_plugins_digest_count() == 0, "reset empties the registry");
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
    testSteerGateV1();
    testSteerGateV2();
    testSteerGateV3();
    testSteerShift(1);
    testSteerShift(2);
    testDigestRegistry();
    std::printf("%s: %d failure(s)\n", gFailures ? "FAILED" : "OK", gFailures);
    return gFailures ? 1 : 0;
}
