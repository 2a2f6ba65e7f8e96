// The native half of transparent capture: asks netfilter's connection
// tracking where an accepted TCP connection was going before a NAT REDIRECT
// rule (nft `redirect to :15001`, iptables -j REDIRECT) rewrote its
// destination to the capture port. Node has no binding for
// getsockopt(SO_ORIGINAL_DST), so this is the smallest addon that makes the
// one call; everything else (which socket, what to do with the answer) stays
// in TypeScript, in src/proxy/transparent/original-dst.ts.
//
// Exports originalDst(fd, family) -> { address, port }; throws an Error whose
// message names the errno and what it usually means, and whose `code` is the
// errno name (ENOENT, ...).
#include <napi.h>

#include <cerrno>
#include <cstring>
#include <string>

#ifdef __linux__
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
// Carries SO_ORIGINAL_DST (80). Guarded below too: some libc/kernel header
// combinations ship a netfilter_ipv4.h without it.
#include <linux/netfilter_ipv4.h>
#endif

#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif
// The IPv6 option lives in linux/netfilter_ipv6/ip6_tables.h, which also
// declares the whole ip6tables ABI (and does not always compile as C++);
// the value has been 80 since the option was added (Linux 3.7).
#ifndef IP6T_SO_ORIGINAL_DST
#define IP6T_SO_ORIGINAL_DST 80
#endif

namespace {

// The symbolic name of the errnos getsockopt can give here, so that a
// message can be matched on without depending on the locale's strerror text.
const char* ErrnoName(int err) {
  switch (err) {
    case ENOENT: return "ENOENT";
    case EBADF: return "EBADF";
    case ENOTSOCK: return "ENOTSOCK";
    case ENOPROTOOPT: return "ENOPROTOOPT";
    case EINVAL: return "EINVAL";
    case EFAULT: return "EFAULT";
    case ENOTCONN: return "ENOTCONN";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENOMEM: return "ENOMEM";
    case ENOSYS: return "ENOSYS";
    default: return "EUNKNOWN";
  }
}

// What an errno from SO_ORIGINAL_DST means for the caller, in the terms of
// the kernel code that returns it (net/netfilter/nf_conntrack_proto.c).
const char* Meaning(int err) {
  switch (err) {
    // No conntrack entry for this socket's 4-tuple: nothing rewrote it, or
    // connection tracking was never enabled in this network namespace.
    case ENOENT: return "the connection was not redirected";
    // No handler registered for the option at this level: nf_conntrack is not
    // loaded, or the socket is not TCP/SCTP.
    case ENOPROTOOPT: return "connection tracking is not loaded, or the socket is not TCP";
    case EBADF: return "the file descriptor is not open";
    case ENOTSOCK: return "the file descriptor is not a socket";
    case ENOSYS: return "SO_ORIGINAL_DST exists only on Linux";
    default: return "getsockopt failed";
  }
}

Napi::Value Fail(Napi::Env env, const char* option, int err) {
  std::string message = std::string(option) + ": " + std::strerror(err) + " (" + ErrnoName(err) + "): " + Meaning(err);
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, ErrnoName(err)));
  error.Set("errno", Napi::Number::New(env, err));
  error.Set("syscall", Napi::String::New(env, "getsockopt"));
  error.ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value Result(Napi::Env env, const char* address, unsigned port) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("address", Napi::String::New(env, address));
  out.Set("port", Napi::Number::New(env, port));
  return out;
}

Napi::Value OriginalDst(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "originalDst(fd, family): fd and family (4 or 6) must be numbers").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  double fdArg = info[0].As<Napi::Number>().DoubleValue();
  int family = info[1].As<Napi::Number>().Int32Value();
  // Checked as a double first: Int32Value() would quietly turn 3.5 or 2^40
  // into some other, possibly open, descriptor.
  if (!(fdArg >= 0 && fdArg <= 2147483647.0) || fdArg != static_cast<double>(static_cast<int>(fdArg))) {
    Napi::TypeError::New(env, "originalDst: fd must be a non-negative integer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (family != 4 && family != 6) {
    Napi::TypeError::New(env, "originalDst: family must be 4 or 6").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = static_cast<int>(fdArg);
#ifdef __linux__
  char text[INET6_ADDRSTRLEN];
  if (family == 4) {
    sockaddr_in dst;
    std::memset(&dst, 0, sizeof dst);
    socklen_t len = sizeof dst;
    if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dst, &len) != 0) return Fail(env, "SO_ORIGINAL_DST", errno);
    if (inet_ntop(AF_INET, &dst.sin_addr, text, sizeof text) == nullptr) return Fail(env, "SO_ORIGINAL_DST", errno);
    return Result(env, text, ntohs(dst.sin_port));
  }
  sockaddr_in6 dst;
  std::memset(&dst, 0, sizeof dst);
  socklen_t len = sizeof dst;
  if (getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &dst, &len) != 0) return Fail(env, "IP6T_SO_ORIGINAL_DST", errno);
  if (inet_ntop(AF_INET6, &dst.sin6_addr, text, sizeof text) == nullptr) return Fail(env, "IP6T_SO_ORIGINAL_DST", errno);
  return Result(env, text, ntohs(dst.sin6_port));
#else
  // Compiled everywhere so that `npm ci` works on a developer's macOS laptop;
  // only transparent capture, which is Linux-only, calls this.
  (void)fd;
  return Fail(env, family == 4 ? "SO_ORIGINAL_DST" : "IP6T_SO_ORIGINAL_DST", ENOSYS);
#endif
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("originalDst", Napi::Function::New(env, OriginalDst, "originalDst"));
  return exports;
}

}  // namespace

NODE_API_MODULE(original_dst, Init)
