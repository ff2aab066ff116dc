// The constants digest of a steering node (docs/contract.md "Integrity digests", issue 14): sha256 over the node's
// constant attributes in ascending order of name, each as
//     utf8(name) || 0x00 || tag || uint64_le(count) || data
// with tag 'f' (0x66) and the values as float32 little-endian, or tag 'i' (0x69) and the values as int64
// little-endian; lowercase hex. The exporter computes it from the ONNX node's attributes, the plugin library from the
// plugin fields it deserialises (an int32 field is widened to int64), and the runtimes compare the two.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace aligner
{

class ConstantsDigest
{
public:
    // A float attribute (FLOAT: count 1; TENSOR: its flattened values).
    void addFloats(std::string const& name, float const* values, size_t count);
    // An int attribute (INT: count 1), each value widened to int64.
    void addInts(std::string const& name, int64_t const* values, size_t count);
    void addInt(std::string const& name, int64_t value)
    {
        addInts(name, &value, 1);
    }
    // The canonical bytes (attributes sorted by name) and their sha256.
    std::vector<unsigned char> canonicalBytes() const;
    std::string hex() const;

private:
    struct Attribute
    {
        std::string name;
        unsigned char tag;
        uint64_t count;
        std::vector<unsigned char> data; // little-endian values
    };
    std::vector<Attribute> mAttributes;
};

} // namespace aligner
