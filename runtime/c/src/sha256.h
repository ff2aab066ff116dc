// SHA-256 of a file, hex encoded: checks the export manifest against the ENGINE.json stamp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace aligner
{
std::string sha256Hex(void const* data, size_t size);
} // namespace aligner
