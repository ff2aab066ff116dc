// Reads the few top-level values the C API needs from inferaligner.json and ENGINE.json. Not a general JSON parser:
// it finds "key": at the top level of one object and reads a string, an integer or an array of integers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace aligner
{
bool jsonString(std::string const& text, std::string const& key, std::string& value);
bool jsonInt(std::string const& text, std::string const& key, int64_t& value);
bool jsonIntArray(std::string const& text, std::string const& key, std::vector<int64_t>& values);
} // namespace aligner
