// SHA-256 (FIPS 180-4), lowercase hex: the constants digests of the plugins (steerDigest.h) and the C runtime's
// checks of the manifest and the engine against the ENGINE.json stamp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace aligner
{
std::string sha256Hex(void const* data, size_t size);
} // namespace aligner
