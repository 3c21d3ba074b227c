// One exception type for everything the core rejects. Messages name the op and the offending
// shapes/dtypes and, where there is one, the fix; the addon turns them into JavaScript Errors.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace tk {

struct Error : std::runtime_error {
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  detail::append(os, parts...);
  throw Error(os.str());
}

#define TK_CHECK(cond, ...)                    \
  do {                                         \
    if (!(cond)) ::tk::fail(__VA_ARGS__);      \
  } while (0)

}  // namespace tk
