#include "steerDigest.h"

#include "sha256.h"

#include <algorithm>
#include <cstring>

namespace aligner
{
namespace
{
void appendLittleEndian(std::vector<unsigned char>& out, uint64_t value, int bytes)
{
    for (int i = 0; i < bytes; ++i)
    {
        out.push_back(static_cast<unsigned char>(value >> (8 * i)));
    }
}
} // namespace

void ConstantsDigest::addFloats(std::string const& name, float const* values, size_t count)
{
    Attribute attribute{name, 'f', count, {}};
    attribute.data.reserve(count * 4);
    for (size_t i = 0; i < count; ++i)
    {
        uint32_t bits;
        std::memcpy(&bits, &values[i], sizeof bits);
        appendLittleEndian(attribute.data, bits, 4);
    }
    mAttributes.push_back(std::move(attribute));
}

void ConstantsDigest::addInts(std::string const& name, int64_t const* values, size_t count)
{
    Attribute attribute{name, 'i', count, {}};
    attribute.data.reserve(count * 8);
    for (size_t i = 0; i < count; ++i)
    {
        appendLittleEndian(attribute.data, static_cast<uint64_t>(values[i]), 8);
    }
    mAttributes.push_back(std::move(attribute));
}

std::vector<unsigned char> ConstantsDigest::canonicalBytes() const
{
    std::vector<Attribute const*> sorted;
    for (auto const& attribute : mAttributes)
    {
        sorted.push_back(&attribute);
    }
    // Byte order of the UTF-8 names, which is the code-point order Python's sorted() uses.
    std::stable_sort(sorted.begin(), sorted.end(), [](Attribute const* a, Attribute const* b) {
        return std::lexicographical_compare(a->name.begin(), a->name.end(), b->name.begin(), b->name.end(),
            [](char x, char y) { return static_cast<unsigned char>(x) < static_cast<unsigned char>(y); });
    });
    std::vector<unsigned char> bytes;
    for (Attribute const* attribute : sorted)
    {
        bytes.insert(bytes.end(), attribute->name.begin(), attribute->name.end());
        bytes.push_back(0x00);
        bytes.push_back(attribute->tag);
        appendLittleEndian(bytes, attribute->count, 8);
        bytes.insert(bytes.end(), attribute->data.begin(), attribute->data.end());
    }
    return bytes;
}

std::string ConstantsDigest::hex() const
{
    std::vector<unsigned char> const bytes = canonicalBytes();
    return sha256Hex(bytes.data(), bytes.size());
}

} // namespace aligner
