#include "jsonScan.h"

#include <cctype>
#include <cstdlib>

namespace aligner
{
namespace
{
// Position just after `"key":` at nesting depth 1, or npos. Skips strings so keys inside values do not match.
size_t findValue(std::string const& text, std::string const& key)
{
    int depth = 0;
    for (size_t i = 0; i < text.size(); ++i)
    {
        char const c = text[i];
        if (c == '{' || c == '[')
        {
            ++depth;
        }
        else if (c == '}' || c == ']')
        {
            --depth;
        }
        else if (c == '"')
        {
            size_t const start = i + 1;
            size_t end = start;
            while (end < text.size() && text[end] != '"')
            {
                end += text[end] == '\\' ? 2 : 1;
            }
            if (end >= text.size())
            {
                return std::string::npos;
            }
            size_t after = end + 1;
            while (after < text.size() && std::isspace(static_cast<unsigned char>(text[after])))
            {
                ++after;
            }
            if (depth == 1 && after < text.size() && text[after] == ':' && text.compare(start, end - start, key) == 0)
            {
                ++after;
                while (after < text.size() && std::isspace(static_cast<unsigned char>(text[after])))
                {
                    ++after;
                }
                return after;
            }
            i = end;
        }
    }
    return std::string::npos;
}
} // namespace

bool jsonString(std::string const& text, std::string const& key, std::string& value)
{
    size_t pos = findValue(text, key);
    if (pos == std::string::npos || text[pos] != '"')
    {
        return false;
    }
    value.clear();
    for (++pos; pos < text.size() && text[pos] != '"'; ++pos)
    {
        if (text[pos] == '\\' && pos + 1 < text.size())
        {
            ++pos;
        }
        value.push_back(text[pos]);
    }
    return pos < text.size();
}

bool jsonInt(std::string const& text, std::string const& key, int64_t& value)
{
    size_t const pos = findValue(text, key);
    if (pos == std::string::npos)
    {
        return false;
    }
    char* end = nullptr;
    long long const parsed = std::strtoll(text.c_str() + pos, &end, 10);
    if (end == text.c_str() + pos)
    {
        return false;
    }
    value = parsed;
    return true;
}

bool jsonIntArray(std::string const& text, std::string const& key, std::vector<int64_t>& values)
{
    size_t pos = findValue(text, key);
    if (pos == std::string::npos || text[pos] != '[')
    {
        return false;
    }
    values.clear();
    ++pos;
    while (pos < text.size())
    {
        while (pos < text.size() && (std::isspace(static_cast<unsigned char>(text[pos])) || text[pos] == ','))
        {
            ++pos;
        }
        if (pos < text.size() && text[pos] == ']')
        {
            return true;
        }
        char* end = nullptr;
        long long const parsed = std::strtoll(text.c_str() + pos, &end, 10);
        if (end == text.c_str() + pos)
        {
            return false;
        }
        values.push_back(parsed);
        pos = static_cast<size_t>(end - text.c_str());
    }
    return false;
}
} // namespace aligner
