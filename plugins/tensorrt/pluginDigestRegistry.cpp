// The process-wide constants-digest registry (pluginDigestRegistry.h). A deque keeps the entries' strings at stable
// addresses while later entries are appended.
#include "pluginDigestRegistry.h"

#include "pluginUtils.h"

#include <deque>
#include <mutex>
#include <string>

namespace
{
struct DigestEntry
{
    std::string name;
    std::string op;
    std::string version;
    std::string hex;
};

std::mutex gMutex;
std::deque<DigestEntry> gEntries;
} // namespace

namespace aligner
{
namespace trt
{
void recordConstantsDigest(char const* name, char const* op, char const* version, std::string const& hex) noexcept
{
    try
    {
        std::lock_guard<std::mutex> lock(gMutex);
        gEntries.push_back({name != nullptr ? name : "", op, version, hex});
    }
    catch (...)
    {
        reportError(std::string(op) + ": out of memory recording the constants digest");
    }
}
} // namespace trt
} // namespace aligner

extern "C" void aligner_plugins_digest_reset(void)
{
    std::lock_guard<std::mutex> lock(gMutex);
    gEntries.clear();
}

extern "C" int32_t aligner_plugins_digest_count(void)
{
    std::lock_guard<std::mutex> lock(gMutex);
    return static_cast<int32_t>(gEntries.size());
}

extern "C" int32_t aligner_plugins_digest_at(
    int32_t index, const char** name, const char** op, const char** version, const char** hex)
{
    std::lock_guard<std::mutex> lock(gMutex);
    if (index < 0 || static_cast<size_t>(index) >= gEntries.size() || name == nullptr || op == nullptr
        || version == nullptr || hex == nullptr)
    {
        return -1;
    }
    DigestEntry const& entry = gEntries[static_cast<size_t>(index)];
    *name = entry.name.c_str();
    *op = entry.op.c_str();
    *version = entry.version.c_str();
    *hex = entry.hex.c_str();
    return 0;
}
