// The device side of a deploy (see device.h). Runs as the login user; with --sudo exactly the
// steps that need root (creating the prefix, the unit file in the unit folder, systemctl) go
// through `sudo -n`, and nothing else does. Every program is started with an argv, never a shell.
#include "device.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <gnu/libc-version.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "json.h"

namespace tvmbundle {
namespace {

constexpr const char* kDefaultUnit = "tvmbundle.service";

// A step that failed or refused: printed as {"ok": false, "step": ..., "error": ...}, exit 1.
struct StepError : std::runtime_error {
  StepError(std::string step, const std::string& what) : std::runtime_error(what), step(std::move(step)) {}
  std::string step;
};

// ---- SHA-256 (FIPS 180-4) -------------------------------------------------------------------

class Sha256 {
 public:
  Sha256() { Reset(); }
  void Update(const uint8_t* p, size_t n) {
    total_ += n;
    while (n > 0) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take, p += take, n -= take;
      if (fill_ == 64) Block(buf_), fill_ = 0;
    }
  }
  std::string HexDigest() {
    uint64_t bits = total_ * 8;
    uint8_t pad = 0x80;
    Update(&pad, 1);
    uint8_t zero = 0;
    while (fill_ != 56) Update(&zero, 1);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(bits >> (56 - 8 * i));
    Update(len, 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h_)
      for (int s = 28; s >= 0; s -= 4) out += hex[(v >> s) & 0xf];
    return out;
  }

 private:
  static uint32_t Rot(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void Reset() {
    static const uint32_t init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::memcpy(h_, init, sizeof(h_));
    fill_ = 0, total_ = 0;
  }
  void Block(const uint8_t* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rot(w[i - 15], 7) ^ Rot(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rot(w[i - 2], 17) ^ Rot(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rot(e, 6) ^ Rot(e, 11) ^ Rot(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rot(a, 2) ^ Rot(a, 13) ^ Rot(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t fill_;
  uint64_t total_;
};

// ---- files ----------------------------------------------------------------------------------

bool Exists(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0;
}
bool IsDir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool IsFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool Writable(const std::string& p) { return access(p.c_str(), W_OK) == 0; }
std::string Err() { return std::strerror(errno); }

std::string Parent(const std::string& p) {
  size_t slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

std::string NearestExisting(std::string p) {
  while (!Exists(p) && p != "/" && p != ".") p = Parent(p);
  return p;
}

void MkdirP(const std::string& p, mode_t mode = 0755) {
  if (p.empty() || IsDir(p)) return;
  MkdirP(Parent(p), mode);
  if (mkdir(p.c_str(), mode) != 0 && errno != EEXIST) throw std::runtime_error(p + ": cannot create (" + Err() + ")");
}

int RemoveOne(const char* path, const struct stat*, int type, struct FTW*) {
  return (type == FTW_DP ? rmdir(path) : unlink(path)) == 0 ? 0 : -1;
}
void RemoveTree(const std::string& p) {
  if (!Exists(p)) return;
  if (nftw(p.c_str(), RemoveOne, 16, FTW_DEPTH | FTW_PHYS) != 0)
    throw std::runtime_error(p + ": cannot remove (" + Err() + ")");
}

std::string ReadText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot read (" + Err() + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteAtomic(const std::string& path, const std::string& text, mode_t mode) {
  std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode);
  if (fd < 0) throw std::runtime_error(tmp + ": cannot write (" + Err() + ")");
  bool ok = write(fd, text.data(), text.size()) == ssize_t(text.size());
  ok = fchmod(fd, mode) == 0 && ok;
  ok = fsync(fd) == 0 && ok;
  ok = close(fd) == 0 && ok;
  if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
    std::string why = Err();
    unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot write (" + why + ")");
  }
}

void CopyFile(const std::string& from, const std::string& to, mode_t mode) {
  std::ifstream in(from, std::ios::binary);
  if (!in) throw std::runtime_error(from + ": cannot read (" + Err() + ")");
  std::string tmp = to + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << in.rdbuf();
    if (!out.flush()) throw std::runtime_error(tmp + ": cannot write (" + Err() + ")");
  }
  if (chmod(tmp.c_str(), mode) != 0 || rename(tmp.c_str(), to.c_str()) != 0) {
    std::string why = Err();
    unlink(tmp.c_str());
    throw std::runtime_error(to + ": cannot write (" + why + ")");
  }
}

uint64_t FreeBytes(const std::string& path) {
  struct statvfs v;
  if (statvfs(path.c_str(), &v) != 0) return 0;
  return uint64_t(v.f_bavail) * v.f_frsize;
}

// Entries of a folder (no . and ..), or none when it does not exist.
std::vector<std::string> List(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool IsHex64(const std::string& s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

bool ValidId(const std::string& s) {
  if (s.empty() || s.size() > 128) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-'; });
}

bool ValidUnitName(const std::string& s) {
  if (s.size() < 9 || s.size() > 128 || s.compare(s.size() - 8, 8, ".service") != 0) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.' || c == '@';
  }) && s[0] != '.';
}

// ---- the install prefix ----------------------------------------------------------------------
//
// The same layout as bundler/package/layout.py: the store and staging are shared by every bundle of
// the device, each bundle name has its own releases/, current and unit. A Prefix without a name is the
// legacy single-service layout (releases/ and current right under the prefix, tvmbundle.service),
// which a deploy of the same name adopts (activate --adopt).

bool ValidBundleName(const std::string& s) {
  if (s.empty() || s.size() > 64 || s[0] == '.' || s[0] == '-') return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
  });
}

struct Prefix {
  std::string root, name;   // name: the bundle's; "" for the legacy layout
  std::string Store() const { return root + "/store/sha256"; }
  std::string Staging() const { return root + "/staging"; }
  std::string Base() const { return name.empty() ? root : root + "/bundles/" + name; }
  std::string Releases() const { return Base() + "/releases"; }
  std::string Release(const std::string& id) const { return Releases() + "/" + id; }
  std::string Current() const { return Base() + "/current"; }
  std::string Unit() const { return name.empty() ? kDefaultUnit : "tvmbundle@" + name + ".service"; }
  Prefix Legacy() const { return Prefix{root, ""}; }
  Prefix Named(const std::string& n) const { return Prefix{root, n}; }
};

Prefix CheckedPrefix(const std::string& p, const std::string& name = "") {
  std::string why;
  if (p.empty() || p[0] != '/') throw ArgError("--prefix: '" + p + "' is not allowed; expected an absolute path");
  std::string rel = SafeRelativePath(p.substr(1), &why);
  if (rel.empty()) throw ArgError("--prefix: '" + p + "' is not allowed: " + why);
  if (!name.empty() && !ValidBundleName(name))
    throw ArgError("--name: '" + name + "' is not allowed; expected 1 to 64 letters, digits, '_', '.' or '-', "
                   "not starting with '.' or '-'");
  return Prefix{"/" + rel, name};
}

// The bundle names with a folder under PREFIX/bundles.
std::vector<std::string> BundleNames(const Prefix& px) {
  std::vector<std::string> out;
  for (const std::string& n : List(px.root + "/bundles"))
    if (ValidBundleName(n) && IsDir(px.root + "/bundles/" + n)) out.push_back(n);
  return out;
}

std::string CurrentId(const Prefix& px) {
  char buf[4096];
  ssize_t n = readlink(px.Current().c_str(), buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  std::string link(buf, size_t(n));
  size_t slash = link.find_last_of('/');
  return slash == std::string::npos ? link : link.substr(slash + 1);
}

double MTime(const std::string& p) {
  struct stat st;
  if (lstat(p.c_str(), &st) != 0) return 0;
  return double(st.st_mtim.tv_sec) + st.st_mtim.tv_nsec * 1e-9;
}

// Complete releases, newest first (by the time they were last made current or installed).
std::vector<std::string> Releases(const Prefix& px) {
  std::vector<std::pair<double, std::string>> found;
  for (const std::string& n : List(px.Releases())) {
    if (n.find('.') != std::string::npos || !IsFile(px.Release(n) + "/manifest.json")) continue;
    found.emplace_back(MTime(px.Release(n)), n);
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

// Hard links of every file of the tree `from` at the same places under `to` (symbolic links are
// copied as links): a release adopted from the legacy layout shares its files with the store.
void LinkTree(const std::string& from, const std::string& to) {
  MkdirP(to);
  for (const std::string& n : List(from)) {
    std::string a = from + "/" + n, b = to + "/" + n;
    struct stat st;
    if (lstat(a.c_str(), &st) != 0) throw std::runtime_error(a + ": " + Err());
    if (S_ISDIR(st.st_mode)) {
      LinkTree(a, b);
    } else if (S_ISLNK(st.st_mode)) {
      char buf[4096];
      ssize_t k = readlink(a.c_str(), buf, sizeof(buf) - 1);
      if (k < 0 || symlink(std::string(buf, size_t(k)).c_str(), b.c_str()) != 0) throw std::runtime_error(b + ": " + Err());
    } else if (link(a.c_str(), b.c_str()) != 0) {
      CopyFile(a, b, st.st_mode & 0755);
    }
  }
}

// ---- other programs ---------------------------------------------------------------------------

std::string Which(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
  dirs += ":/usr/sbin:/sbin";   // a login user's PATH often lacks them; systemctl lives in /usr/bin anyway
  std::stringstream ss(dirs);
  std::string d;
  while (std::getline(ss, d, ':')) {
    if (d.empty()) continue;
    std::string cand = d + "/" + name;
    if (access(cand.c_str(), X_OK) == 0 && IsFile(cand)) return cand;
  }
  return "";
}

// Runs argv (no shell) with `input` on its stdin (a manifest for ssh-keygen -Y verify; "": an empty
// stdin), returns its exit code (127: could not start) with stdout+stderr in *out.
// Writing and reading are interleaved with poll(), so neither side blocks on a full pipe; a program
// that exits without reading all of its input is not an error here (its exit code says what happened).
int RunWithInput(const std::vector<std::string>& argv, const std::string& input, std::string* out) {
  int in[2], outp[2];
  if (pipe(in) != 0) throw std::runtime_error("pipe: " + Err());
  if (pipe(outp) != 0) {
    close(in[0]), close(in[1]);
    throw std::runtime_error("pipe: " + Err());
  }
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork: " + Err());
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(outp[1], 1);
    dup2(outp[1], 2);
    close(in[0]), close(in[1]), close(outp[0]), close(outp[1]);
    std::vector<char*> cargv;
    for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
    cargv.push_back(nullptr);
    execvp(cargv[0], cargv.data());
    std::fprintf(stderr, "%s: cannot run (%s)\n", cargv[0], std::strerror(errno));
    _exit(127);
  }
  close(in[0]);
  close(outp[1]);
  // A reader that went away must not kill us with SIGPIPE: ignore it while we write.
  struct sigaction ignore {}, saved {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  sigaction(SIGPIPE, &ignore, &saved);
  fcntl(in[1], F_SETFL, fcntl(in[1], F_GETFL) | O_NONBLOCK);
  size_t written = 0;
  int wfd = in[1];
  if (input.empty()) close(wfd), wfd = -1;
  out->clear();
  bool reading = true;
  while (reading) {
    struct pollfd p[2] = {{outp[0], POLLIN, 0}, {wfd, POLLOUT, 0}};
    if (poll(p, wfd >= 0 ? 2 : 1, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (wfd >= 0 && (p[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t n = write(wfd, input.data() + written, input.size() - written);
      if (n > 0) written += size_t(n);
      if ((n < 0 && errno != EAGAIN && errno != EINTR) || written == input.size()) close(wfd), wfd = -1;
    }
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      char buf[4096];
      ssize_t n = read(outp[0], buf, sizeof(buf));
      if (n > 0) out->append(buf, size_t(n));
      else if (n == 0 || errno != EINTR) reading = false;
    }
  }
  if (wfd >= 0) close(wfd);
  close(outp[0]);
  sigaction(SIGPIPE, &saved, nullptr);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

int Run(const std::vector<std::string>& argv, std::string* out) { return RunWithInput(argv, "", out); }

std::string LastLines(const std::string& text, int n = 3) {
  std::vector<std::string> lines;
  std::stringstream ss(text);
  std::string l;
  while (std::getline(ss, l))
    if (!l.empty()) lines.push_back(l);
  std::string out;
  for (size_t i = lines.size() > size_t(n) ? lines.size() - n : 0; i < lines.size(); ++i) out += (out.empty() ? "" : " | ") + lines[i];
  return out;
}

std::string LoginUser() {
  struct passwd* pw = getpwuid(geteuid());
  return pw ? pw->pw_name : std::to_string(geteuid());
}

// Runs a step that needs root: as is when we are root or sudo was not asked for, else through
// `sudo -n` (never prompting). A refused sudo is reported as such.
struct Privileged {
  bool sudo = false;
  int Run(const std::string& step, std::vector<std::string> argv, std::string* out) const {
    if (sudo && geteuid() != 0) argv.insert(argv.begin(), {"sudo", "-n", "--"});
    int rc = tvmbundle::Run(argv, out);
    if (rc != 0 && sudo && out->find("password is required") != std::string::npos) {
      throw StepError(step, "sudo needs a password for " + LoginUser() + " on this device (sudo -n " + argv[3] +
                                " was refused); allow it without a password (a sudoers.d NOPASSWD rule) or log in as root");
    }
    return rc;
  }
  void Check(const std::string& step, const std::vector<std::string>& argv) const {
    std::string out;
    int rc = Run(step, argv, &out);
    if (rc != 0) {
      std::string cmd;
      for (const auto& a : argv) cmd += (cmd.empty() ? "" : " ") + a;
      throw StepError(step, "`" + cmd + "` exited " + std::to_string(rc) + ": " + LastLines(out));
    }
  }
};

// ---- the manifest -------------------------------------------------------------------------------

struct Entry {
  std::string path, sha256;
  uint64_t size = 0;
  mode_t mode = 0644;
};

struct Manifest {
  std::string text, bundle_id, name, board, created, listen;
  std::vector<Entry> files;
};

std::string StrOf(const json::Value* v) { return v && v->IsString() ? v->str : ""; }

// The manifest `text` read from `file` (named in errors), checked before anything is written.
Manifest ParseManifest(const std::string& file, std::string text) {
  Manifest m;
  m.text = std::move(text);
  json::Value doc;
  std::string err;
  if (!json::Parse(m.text, &doc, &err) || !doc.IsObject()) throw StepError("install", file + ": not a JSON object (" + err + ")");
  m.bundle_id = StrOf(doc.Find("bundle_id"));
  m.name = StrOf(doc.Find("name"));
  m.created = StrOf(doc.Find("created"));
  if (const json::Value* b = doc.Find("board"); b && b->IsObject()) m.board = StrOf(b->Find("name"));
  if (const json::Value* v = doc.Find("service"); v && v->IsObject()) m.listen = StrOf(v->Find("listen"));
  if (!ValidId(m.bundle_id)) throw StepError("install", "manifest.json: bundle_id '" + m.bundle_id + "' is not allowed; expected letters, digits, '_' and '-'");
  const json::Value* files = doc.Find("files");
  if (!files || !files->IsArray()) throw StepError("install", "manifest.json: files is missing or not an array");
  std::set<std::string> seen;
  for (size_t i = 0; i < files->items.size(); ++i) {
    const json::Value& f = files->items[i];
    std::string where = "manifest.json: files[" + std::to_string(i) + "]";
    if (!f.IsObject()) throw StepError("install", where + " is not an object");
    Entry e;
    std::string raw = StrOf(f.Find("path")), why;
    e.path = SafeRelativePath(raw, &why);
    if (e.path.empty()) throw StepError("install", where + ".path '" + raw + "' is not allowed: " + why + "; nothing was installed");
    if (e.path == "manifest.json" || e.path == "manifest.json.sig" || e.path.rfind(".deploy/", 0) == 0 || e.path == ".deploy")
      throw StepError("install", where + ".path '" + raw + "' is not allowed: the name is reserved for the deploy itself");
    if (!seen.insert(e.path).second) throw StepError("install", where + ".path '" + raw + "' is listed twice");
    e.sha256 = StrOf(f.Find("sha256"));
    if (!IsHex64(e.sha256)) throw StepError("install", where + ".sha256 '" + e.sha256 + "' is not a SHA-256 hex digest");
    if (const json::Value* s = f.Find("size"); s && s->IsNumber()) e.size = uint64_t(s->number);
    std::string mode = StrOf(f.Find("mode"));
    e.mode = mode.empty() ? 0644 : mode_t(std::strtoul(mode.c_str(), nullptr, 8)) & 0755;
    m.files.push_back(e);
  }
  // No entry may sit below another entry's path (a file used as a folder).
  for (const Entry& e : m.files) {
    for (size_t s = e.path.find('/'); s != std::string::npos; s = e.path.find('/', s + 1)) {
      if (seen.count(e.path.substr(0, s))) throw StepError("install", "manifest.json: '" + e.path + "' lies below the file '" + e.path.substr(0, s) + "'");
    }
  }
  return m;
}

// What status and survey say of a kept release: read from its manifest, "?" where it cannot be.
struct ReleaseFacts {
  std::string name = "?", board = "?", created = "?", listen;
};

ReleaseFacts ReadReleaseFacts(const std::string& dir) {
  ReleaseFacts f;
  json::Value doc;
  std::string err;
  try {
    if (json::Parse(ReadText(dir + "/manifest.json"), &doc, &err) && doc.IsObject()) {
      f.name = StrOf(doc.Find("name"));
      f.created = StrOf(doc.Find("created"));
      if (const json::Value* b = doc.Find("board"); b && b->IsObject()) f.board = StrOf(b->Find("name"));
      if (const json::Value* v = doc.Find("service"); v && v->IsObject()) f.listen = StrOf(v->Find("listen"));
    }
  } catch (const std::exception&) {
  }
  return f;
}

// Whether services listening on `a` and `b` (HOST:PORT, [V6]:PORT) would collide: the same port on
// the same address, or on a wildcard address and any other, or on two names of the loopback host.
// (The host checks the same before it sends anything: bundler/device/release.py's _same_socket.)
bool SameSocket(const std::string& a, const std::string& b) {
  auto split = [](const std::string& l) {
    size_t c = l.find_last_of(':');
    std::string host = c == std::string::npos ? "" : l.substr(0, c), port = c == std::string::npos ? l : l.substr(c + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    return std::make_pair(host, port);
  };
  auto [ha, pa] = split(a);
  auto [hb, pb] = split(b);
  if (pa != pb) return false;
  auto wild = [](const std::string& h) { return h.empty() || h == "0.0.0.0" || h == "::"; };
  auto self = [](const std::string& h) { return h == "localhost" || h == "127.0.0.1" || h == "::1"; };
  return ha == hb || wild(ha) || wild(hb) || (self(ha) && self(hb));
}

// Another bundle of the device whose current release serves on the address `m` would take: what
// install says of it, or "" (every installer runs install: deploy, Ansible, Mender).
std::string ListenConflict(const Prefix& px, const Manifest& m) {
  auto taken = [&](const std::string& other, const std::string& unit) {
    return "bundle '" + m.name + "' listens on " + m.listen + ", which bundle '" + other + "' (" + unit +
           ") already serves on this device; give one of them its own address (tvmbundle make --listen HOST:PORT)";
  };
  if (m.listen.empty()) return "";
  for (const std::string& n : BundleNames(px)) {
    Prefix other = px.Named(n);
    std::string c = CurrentId(other);
    if (n != m.name && !c.empty() && SameSocket(m.listen, ReadReleaseFacts(other.Release(c)).listen))
      return taken(n, other.Unit());
  }
  // The single-service layout, beside the bundles (when installing into it, its release is this one's predecessor).
  Prefix legacy = px.Legacy();
  if (std::string c = px.name.empty() ? "" : CurrentId(legacy); !c.empty()) {
    ReleaseFacts f = ReadReleaseFacts(legacy.Release(c));
    if (f.name != m.name && SameSocket(m.listen, f.listen)) return taken(f.name, kDefaultUnit);
  }
  return "";
}

// ---- signed releases: the device's own trust store ---------------------------------------------
//
// /etc/tvmbundle/allowed_signers (ssh-keygen(1) ALLOWED SIGNERS; `tvmbundle trust` writes it) lists the
// OpenSSH public keys whose signature of a release's manifest.json this device accepts. It is root's
// and 0644 on purpose: a release pusher logs in as the owner of the install prefix, and must not be
// able to replace the list of who may sign what it pushes. When the file lists at least one key,
// install refuses a release without a valid signature by one of them (before anything is stored) and
// activate re-checks the release it switches to against the file as it is now (a rollback to a release
// signed by a since-revoked key is refused). Without the file, unsigned releases are allowed.

constexpr const char* kTrustFile = "/etc/tvmbundle/allowed_signers";
constexpr const char* kSigNamespace = "tvmbundle-manifest";   // ssh-keygen -n of `tvmbundle sign`
constexpr const char* kSigPrincipal = "tvmbundle";            // the identity allowed_signers lines name
constexpr size_t kMaxSignature = 64 * 1024;

struct Trust {
  std::string file;
  bool exists = false;
  int keys = 0;
  bool Enforced() const { return keys > 0; }
};

// Why `path` (and each folder above it) could be changed by someone other than root, or "".
std::string NotRootsAlone(const std::string& path) {
  char real[PATH_MAX];
  if (!realpath(path.c_str(), real)) return path + ": " + Err();
  for (std::string p = real;; p = Parent(p)) {
    struct stat st;
    if (stat(p.c_str(), &st) != 0) return p + ": " + Err();
    if (st.st_uid != 0 || (st.st_mode & 022)) {
      char mode[8];
      std::snprintf(mode, sizeof(mode), "%04o", unsigned(st.st_mode & 07777));
      return p + " is owned by uid " + std::to_string(st.st_uid) + " with mode " + mode +
             " (it must be root's and writable by root alone: chown root:root, chmod go-w)";
    }
    if (p == "/") return "";
  }
}

// The trust file in force. `explicit_file`: given with --trust-file, which then must exist and list a
// key (a pusher chooses the argv: naming a missing or empty file must not switch the checks off).
Trust LoadTrust(const std::string& file, bool explicit_file, const std::string& nothing) {
  Trust t;
  t.file = file;
  struct stat st;
  if (stat(file.c_str(), &st) != 0) {
    if (errno == ENOENT && !explicit_file) return t;
    throw StepError("signature", "--trust-file " + file + ": " + Err() + "; " + nothing);
  }
  t.exists = true;
  if (!S_ISREG(st.st_mode)) throw StepError("signature", "the trust file " + file + " is not a regular file; " + nothing);
  std::string text;
  try {
    text = ReadText(file);
  } catch (const std::exception& e) {
    throw StepError("signature", std::string("the trust file cannot be read: ") + e.what() + "; " + nothing);
  }
  std::stringstream ss(text);
  std::string line;
  while (std::getline(ss, line)) {
    size_t at = line.find_first_not_of(" \t\r");
    if (at != std::string::npos && line[at] != '#') ++t.keys;
  }
  if (explicit_file && t.keys == 0)
    throw StepError("signature", "--trust-file " + file + " lists no key; " + nothing);
  if (t.Enforced()) {
    std::string why = NotRootsAlone(file);
    if (!why.empty()) throw StepError("signature", "the trust file " + file + " cannot be trusted: " + why + "; " + nothing);
  }
  return t;
}

struct SigCheck {
  bool present = false;   // a signature came with the release
  bool valid = false;     // it is a valid signature of exactly these manifest bytes (by some key)
  bool trusted = false;   // ... by a key of the trust file
  std::string fingerprint;
  std::string detail;     // ssh-keygen's last words when it said no
};

std::string FingerprintIn(const std::string& out) {
  std::stringstream ss(out);
  std::string word;
  while (ss >> word)
    if (word.rfind("SHA256:", 0) == 0) return word;
  return "";
}

// Checks `sig_file` against the manifest's bytes (`text`, on ssh-keygen's stdin: the very bytes that
// are parsed and stored). With an enforced trust file: -Y verify against it; when that fails, or with
// none, -Y check-novalidate tells a signature by another key from one of other bytes.
SigCheck CheckSignature(const Trust& trust, const std::string& text, const std::string& sig_file, const std::string& nothing) {
  SigCheck c;
  c.present = !sig_file.empty() && IsFile(sig_file);
  if (!c.present) return c;
  std::string keygen = Which("ssh-keygen");
  if (keygen.empty()) {
    if (trust.Enforced())
      throw StepError("signature", "ssh-keygen is not installed on the device (Debian: openssh-client), and " + trust.file +
                                       " requires signed releases; " + nothing);
    c.detail = "ssh-keygen is not installed: the signature was not checked";
    return c;
  }
  std::string out;
  if (trust.Enforced()) {
    int rc = RunWithInput({keygen, "-Y", "verify", "-f", trust.file, "-I", kSigPrincipal, "-n", kSigNamespace, "-s", sig_file},
                          text, &out);
    if (rc == 0) {
      c.valid = c.trusted = true;
      c.fingerprint = FingerprintIn(out);
      return c;
    }
    c.detail = LastLines(out, 1);
  }
  int rc = RunWithInput({keygen, "-Y", "check-novalidate", "-n", kSigNamespace, "-s", sig_file}, text, &out);
  c.valid = rc == 0;
  if (c.valid) c.fingerprint = FingerprintIn(out);
  else if (c.detail.empty()) c.detail = LastLines(out, 1);
  return c;
}

// The StepError for a release the trust file does not let through.
void RequireTrusted(const Trust& trust, const SigCheck& c, const std::string& what, const std::string& nothing) {
  if (!trust.Enforced() || c.trusted) return;
  std::string keys = std::to_string(trust.keys) + " key(s) of " + trust.file;
  if (!c.present)
    throw StepError("signature", "unsigned: " + what + " has no manifest.json.sig, and this device accepts only releases signed by " +
                                     keys + " (sign it: tvmbundle sign BUNDLE --key KEY); " + nothing);
  if (!c.valid)
    throw StepError("signature", "the manifest changed after signing: " + what + "'s manifest.json.sig is not a valid signature of its "
                                     "manifest.json (" + (c.detail.empty() ? "no detail" : c.detail) + "); " + nothing);
  throw StepError("signature", "not signed by a trusted key: " + what + " is signed by " + (c.fingerprint.empty() ? "an unknown key" : c.fingerprint) +
                                   ", which is not one of the " + keys + " (revoked, or never trusted here); " + nothing);
}

void TrustJson(json::Writer& w, const Trust& trust, const SigCheck& c) {
  w.Key("signed").Bool(c.present && c.valid).Key("signed_by");
  c.trusted ? w.String(c.fingerprint) : w.Null();
  w.Key("signature").BeginObject().Key("present").Bool(c.present).Key("valid").Bool(c.valid).Key("trusted").Bool(c.trusted);
  if (!c.fingerprint.empty()) w.Key("fingerprint").String(c.fingerprint);
  if (!c.detail.empty()) w.Key("detail").String(c.detail);
  w.EndObject();
  w.Key("trust").BeginObject().Key("file").String(trust.file).Key("exists").Bool(trust.exists).Key("keys").Int(trust.keys)
      .Key("enforced").Bool(trust.Enforced()).EndObject();
}

// ---- health --------------------------------------------------------------------------------------

bool Probe(const Prefix& px, std::string* why) {
  std::string out;
  int rc = Run({px.Current() + "/bin/tvm-deploy", "probe", "--timeout", "2"}, &out);
  *why = LastLines(out, 1);
  return rc == 0;
}

bool WaitHealthy(const Prefix& px, double timeout_s, std::string* why) {
  auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    if (Probe(px, why)) return true;
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
}

// ---- commands --------------------------------------------------------------------------------------

void Begin(json::Writer& w, const std::string& cmd) { w.BeginObject().Key("ok").Bool(true).Key("command").String(cmd); }

void PathFacts(json::Writer& w, const std::string& path) {
  std::string near = NearestExisting(path);
  struct stat st;
  bool exists = stat(path.c_str(), &st) == 0;
  w.BeginObject().Key("path").String(path).Key("exists").Bool(exists).Key("writable").Bool(exists && Writable(path));
  if (exists) w.Key("owner_uid").Int(st.st_uid);
  w.Key("nearest").String(near).Key("nearest_writable").Bool(Writable(near)).Key("free_bytes").Uint(FreeBytes(near));
  w.EndObject();
}

int Survey(const std::vector<std::string>& args, json::Writer& w) {
  std::string prefix, name, unit_dir = "/etc/systemd/system";
  bool sudo = false;
  std::vector<std::string> want;
  ArgParser("survey", args).Option("--prefix", &prefix).Option("--name", &name).Option("--unit-dir", &unit_dir)
      .Flag("--sudo", &sudo).Repeated("--want", &want).Require("--prefix").Parse();
  Prefix px = CheckedPrefix(prefix, name);
  struct utsname u;
  uname(&u);
  Begin(w, "survey");
  w.Key("user").String(LoginUser()).Key("uid").Int(geteuid()).Key("gid").Int(getegid());
  w.Key("arch").String(u.machine).Key("glibc").String(gnu_get_libc_version());
  w.Key("prefix");
  PathFacts(w, px.root);
  bool prepared = true;
  for (const std::string& d : {px.Store(), px.Releases(), px.Staging()}) prepared = prepared && IsDir(d) && Writable(d);
  w.Key("prepared").Bool(prepared);
  w.Key("unit_dir");
  PathFacts(w, unit_dir);
  std::string systemctl = Which("systemctl");
  w.Key("systemd").BeginObject().Key("systemctl").String(systemctl).Key("booted").Bool(IsDir("/run/systemd/system")).EndObject();
  w.Key("sudo").BeginObject().Key("requested").Bool(sudo);
  if (sudo) {
    std::string out;
    int rc = Which("sudo").empty() ? 127 : Run({"sudo", "-n", "true"}, &out);
    w.Key("ok").Bool(rc == 0);
    if (rc == 127) w.Key("problem").String("sudo is not installed on the device");
    else if (rc != 0) w.Key("problem").String(out.find("password is required") != std::string::npos
                                                   ? "sudo needs a password for " + LoginUser()
                                                   : "sudo -n true exited " + std::to_string(rc) + ": " + LastLines(out));
  }
  w.EndObject();
  std::string cur = CurrentId(px);
  w.Key("current");
  cur.empty() ? w.Null() : w.String(cur);
  w.Key("releases").BeginArray();
  for (const std::string& r : Releases(px)) w.String(r);
  w.EndArray();
  // Every bundle of the device, for preflight: two services must not listen on one address.
  w.Key("bundles").BeginArray();
  for (const std::string& n : BundleNames(px)) {
    Prefix other = px.Named(n);
    std::string c = CurrentId(other);
    w.BeginObject().Key("name").String(n).Key("unit").String(other.Unit()).Key("current");
    c.empty() ? w.Null() : w.String(c);
    w.Key("listen").String(c.empty() ? "" : ReadReleaseFacts(other.Release(c)).listen).EndObject();
  }
  w.EndArray();
  // The legacy single-service layout, when there is one: a deploy of its bundle's name adopts it,
  // with a unit the host renders for each of its releases (their manifests are sent for that).
  Prefix legacy = px.Legacy();
  std::string legacy_cur = CurrentId(legacy);
  std::vector<std::string> legacy_rels = Releases(legacy);
  w.Key("legacy");
  if (px.name.empty() || (legacy_cur.empty() && legacy_rels.empty())) {
    w.Null();
  } else {
    w.BeginObject().Key("unit").String(kDefaultUnit).Key("unit_installed").Bool(IsFile(unit_dir + "/" + kDefaultUnit))
        .Key("current");
    legacy_cur.empty() ? w.Null() : w.String(legacy_cur);
    ReleaseFacts cf = legacy_cur.empty() ? ReleaseFacts{} : ReadReleaseFacts(legacy.Release(legacy_cur));
    w.Key("name").String(cf.name).Key("listen").String(cf.listen).Key("releases").BeginArray();
    for (const std::string& r : legacy_rels) {
      ReleaseFacts f = ReadReleaseFacts(legacy.Release(r));
      w.BeginObject().Key("id").String(r).Key("name").String(f.name);
      if (f.name == px.name) w.Key("manifest").String(ReadText(legacy.Release(r) + "/manifest.json"));
      w.EndObject();
    }
    w.EndArray().EndObject();
  }
  w.Key("have").BeginArray();
  for (const std::string& s : want)
    if (IsHex64(s) && IsFile(px.Store() + "/" + s)) w.String(s);
  w.EndArray();
  // Whether this device requires signed releases (install refuses others); a trust file that cannot
  // be used is reported here and refused by install.
  w.Key("trust").BeginObject().Key("file").String(kTrustFile);
  try {
    Trust t = LoadTrust(kTrustFile, false, "install refuses every release until it is fixed");
    w.Key("exists").Bool(t.exists).Key("keys").Int(t.keys).Key("enforced").Bool(t.Enforced());
  } catch (const StepError& e) {
    w.Key("exists").Bool(true).Key("enforced").Bool(true).Key("problem").String(e.what());
  }
  w.Key("ssh_keygen").String(Which("ssh-keygen")).EndObject();
  w.EndObject();
  return 0;
}

int Prepare(const std::vector<std::string>& args, json::Writer& w) {
  std::string prefix, name;
  bool sudo = false;
  ArgParser("prepare", args).Option("--prefix", &prefix).Option("--name", &name).Flag("--sudo", &sudo).Require("--prefix").Parse();
  Prefix px = CheckedPrefix(prefix, name);
  Privileged priv{sudo};
  bool created = false, chowned = false;
  std::string owner = std::to_string(geteuid()) + ":" + std::to_string(getegid());
  if (!IsDir(px.root)) {
    if (Writable(NearestExisting(px.root))) {
      MkdirP(px.root);
    } else if (sudo) {
      // Created through sudo, then owned by the login user: everything after this runs without root.
      priv.Check("prepare", {"mkdir", "-p", "-m", "0755", px.root});
      priv.Check("prepare", {"chown", owner, px.root});
    } else {
      throw StepError("prepare", px.root + " does not exist and " + LoginUser() + " cannot create it");
    }
    created = true;
  } else if (!Writable(px.root) || (IsDir(px.Store()) && !Writable(px.Store()))) {
    if (!sudo) throw StepError("prepare", px.root + " is not writable by " + LoginUser());
    priv.Check("prepare", {"chown", "-R", owner, px.root});
    chowned = true;
  }
  for (const std::string& d : {px.Store(), px.Releases(), px.Staging()}) MkdirP(d);
  Begin(w, "prepare");
  w.Key("prefix").String(px.root).Key("created").Bool(created).Key("chowned").Bool(chowned).EndObject();
  return 0;
}

struct GcResult {
  std::vector<std::string> removed, agents;
  int files = 0;
  uint64_t bytes = 0;
};

GcResult CollectGarbage(const Prefix& px, int keep, const std::set<std::string>& protect) {
  GcResult g;
  std::vector<std::string> rels = Releases(px);
  std::set<std::string> kept(protect);
  kept.insert(CurrentId(px));
  int n = 0;
  for (const std::string& r : rels) n += kept.count(r) ? 1 : 0;
  for (const std::string& r : rels) {
    if (kept.count(r)) continue;
    if (n < keep) {
      kept.insert(r);
      ++n;
    }
  }
  for (const std::string& name : List(px.Releases())) {
    if (kept.count(name)) continue;
    RemoveTree(px.Release(name));     // older releases and left-over *.partial folders
    g.removed.push_back(name);
  }
  // Other agents of this login user (~/.cache/tvmbundle/agent/<id>/, earlier harnesses): their files
  // may be links into the store, which would otherwise never reach link count 1.
  char exe[4096];
  ssize_t n_exe = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n_exe > 0) {
    std::string mine = Parent(Parent(std::string(exe, size_t(n_exe))));   // <agents>/<id>
    std::string agents = Parent(mine);
    if (agents.size() > 23 && agents.compare(agents.size() - 23, 23, "/.cache/tvmbundle/agent") == 0) {
      for (const std::string& name : List(agents)) {
        std::string dir = agents + "/" + name;
        if (dir == mine || !IsDir(dir)) continue;
        try {
          RemoveTree(dir);
          g.agents.push_back(name);
        } catch (const std::exception&) {
        }
      }
    }
  }
  // A store file no release links any more (link count 1) is garbage.
  for (const std::string& name : List(px.Store())) {
    std::string p = px.Store() + "/" + name;
    struct stat st;
    if (lstat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 && unlink(p.c_str()) == 0) {
      g.files += 1;
      g.bytes += uint64_t(st.st_size);
    }
  }
  return g;
}

void GcJson(json::Writer& w, const GcResult& g) {
  w.BeginObject().Key("removed_releases").BeginArray();
  for (const auto& r : g.removed) w.String(r);
  w.EndArray().Key("removed_agents").BeginArray();
  for (const auto& a : g.agents) w.String(a);
  w.EndArray().Key("removed_files").Int(g.files).Key("freed_bytes").Uint(g.bytes).EndObject();
}

int Install(const std::vector<std::string>& args, json::Writer& w) {
  std::string prefix, name, manifest_file, unit_file, from, release_dir, sig_file, trust_file;
  bool selftest = false;
  ArgParser("install", args).Option("--prefix", &prefix).Option("--name", &name).Option("--manifest", &manifest_file)
      .Option("--release", &release_dir).Option("--unit", &unit_file).Option("--from", &from).Option("--signature", &sig_file)
      .Option("--trust-file", &trust_file).Flag("--selftest", &selftest).Require("--prefix").Parse();
  Prefix px = CheckedPrefix(prefix, name);
  if (manifest_file.empty() == release_dir.empty()) throw ArgError("install: give --manifest FILE or --release DIR");
  if (!release_dir.empty()) manifest_file = release_dir + "/manifest.json";
  const std::string nothing = "nothing was installed";
  // 0. the signature, checked against the trust file before the manifest is even parsed: the bytes
  //    checked are the bytes parsed and stored (read once)
  Trust trust = LoadTrust(trust_file.empty() ? kTrustFile : trust_file, !trust_file.empty(), nothing);
  if (sig_file.empty()) {
    if (IsFile(manifest_file + ".sig")) sig_file = manifest_file + ".sig";   // a staged copy, or DIR/manifest.json.sig
  } else if (!IsFile(sig_file)) {
    throw StepError("signature", "--signature " + sig_file + ": no such file; " + nothing);
  }
  std::string sig_text;
  if (!sig_file.empty()) {
    sig_text = ReadText(sig_file);
    if (sig_text.size() > kMaxSignature) throw StepError("signature", sig_file + " is too large to be a signature; " + nothing);
  }
  std::string text = ReadText(manifest_file);
  SigCheck sig = CheckSignature(trust, text, sig_file, nothing);
  RequireTrusted(trust, sig, "the release", nothing);
  Manifest m = ParseManifest(manifest_file, std::move(text));    // refuses unsafe paths before anything is written
  // The name picks the folder and the unit; a release must not land in another bundle's.
  if (!px.name.empty() && m.name != px.name)
    throw StepError("install", "the release is bundle '" + m.name + "', not '" + px.name + "'; " + nothing);
  if (std::string why = ListenConflict(px, m); !why.empty()) throw StepError("install", why + "; " + nothing);
  int from_staging = 0, from_agent = 0;
  // 1. every file into the store, checked against its SHA-256 on the way in
  for (const Entry& e : m.files) {
    std::string dest = px.Store() + "/" + e.sha256;
    if (IsFile(dest)) continue;
    std::vector<std::pair<std::string, bool>> sources = {{px.Staging() + "/" + e.sha256 + ".part", true}};
    if (!from.empty()) sources.emplace_back(from + "/" + e.path, false);
    if (!release_dir.empty()) sources.emplace_back(release_dir + "/" + e.path, false);
    bool stored = false;
    for (const auto& [src, staged] : sources) {
      if (!IsFile(src)) continue;
      std::string why, got = Sha256File(src, &why);
      if (got != e.sha256) {
        if (staged) unlink(src.c_str());
        throw StepError("upload", e.path + " arrived damaged (sha256 " + got.substr(0, 12) + ", expected " +
                                      e.sha256.substr(0, 12) + ")" + (why.empty() ? "" : ": " + why));
      }
      if (staged) {
        if (chmod(src.c_str(), e.mode) != 0) throw StepError("upload", e.path + ": storing it failed (" + Err() + ")");
        if (rename(src.c_str(), dest.c_str()) != 0) {
          if (errno != EXDEV) throw StepError("upload", e.path + ": storing it failed (" + Err() + ")");
          try {
            CopyFile(src, dest, e.mode);   // staging on another file system than the store
          } catch (const std::exception& x) {
            throw StepError("upload", e.path + ": storing it failed (" + x.what() + ")");
          }
          unlink(src.c_str());
        }
        ++from_staging;
      } else {
        try {
          // A hard link when the agent's folder is on the store's file system (no second copy on
          // the device's disk; gc prunes the agents it no longer needs), else a copy.
          if (link(src.c_str(), dest.c_str()) != 0) CopyFile(src, dest, e.mode);
        } catch (const std::exception& x) {
          throw StepError("upload", e.path + ": storing it failed (" + x.what() + ")");
        }
        ++from_agent;
      }
      stored = true;
      break;
    }
    if (!stored) throw StepError("upload", e.path + " (" + e.sha256.substr(0, 12) + ") is neither in the store nor staged");
  }
  // 2. the release: store files hard-linked into the bundle's layout, then renamed into place
  std::string final_dir = px.Release(m.bundle_id), partial = final_dir + ".partial";
  bool assembled = false, repaired = false;
  if (IsFile(final_dir + "/manifest.json") && CurrentId(px) != m.bundle_id) {
    // Kept from an earlier install: assembled again when a file of it no longer matches (a failed
    // deploy may have left it damaged), or deploying these bytes again could never succeed.
    for (const Entry& e : m.files) {
      std::string why;
      if (Sha256File(final_dir + "/" + e.path, &why) != e.sha256) {
        RemoveTree(final_dir);
        repaired = true;
        break;
      }
    }
  }
  if (!IsFile(final_dir + "/manifest.json")) {
    RemoveTree(partial);
    MkdirP(partial);
    for (const Entry& e : m.files) {
      std::string dest = partial + "/" + e.path;
      MkdirP(Parent(dest));
      if (link((px.Store() + "/" + e.sha256).c_str(), dest.c_str()) != 0)
        throw StepError("assemble", dest + ": cannot link from the store (" + Err() + ")");
    }
    WriteAtomic(partial + "/manifest.json", m.text, 0644);
    if (sig.valid) WriteAtomic(partial + "/manifest.json.sig", sig_text, 0644);
    RemoveTree(final_dir);
    if (rename(partial.c_str(), final_dir.c_str()) != 0) throw StepError("assemble", final_dir + ": " + Err());
    assembled = true;
  } else if (sig.valid) {
    // Kept from an earlier install (perhaps unsigned then): its manifest and signature become the
    // ones just checked, so that activate re-checks exactly these.
    if (ReadText(final_dir + "/manifest.json") != m.text) WriteAtomic(final_dir + "/manifest.json", m.text, 0644);
    WriteAtomic(final_dir + "/manifest.json.sig", sig_text, 0644);
  }
  if (!unit_file.empty()) {
    std::string unit = unit_file.substr(unit_file.find_last_of('/') + 1);
    if (unit.size() > 5 && unit.compare(0, m.bundle_id.size() + 1, m.bundle_id + ".") == 0) unit = unit.substr(m.bundle_id.size() + 1);
    if (!ValidUnitName(unit)) throw ArgError("--unit: '" + unit + "' is not a unit name (NAME.service)");
    MkdirP(final_dir + "/.deploy");
    WriteAtomic(final_dir + "/.deploy/" + unit, ReadText(unit_file), 0644);
  }
  // 3. the whole release, checked against the manifest (an earlier run may have left it damaged)
  for (const Entry& e : m.files) {
    std::string why, got = Sha256File(final_dir + "/" + e.path, &why);
    if (got != e.sha256)
      throw StepError("check", e.path + " in the release does not match the manifest (sha256 " + (got.empty() ? why : got.substr(0, 12)) +
                                   ", expected " + e.sha256.substr(0, 12) + ")");
  }
  if (manifest_file.rfind(px.Staging() + "/", 0) == 0) unlink(manifest_file.c_str());
  if (unit_file.rfind(px.Staging() + "/", 0) == 0) unlink(unit_file.c_str());
  if (sig_file.rfind(px.Staging() + "/", 0) == 0) unlink(sig_file.c_str());
  Begin(w, "install");
  w.Key("release").String(m.bundle_id).Key("assembled").Bool(assembled).Key("repaired").Bool(repaired)
      .Key("stored_from_staging").Int(from_staging)
      .Key("stored_from_agent").Int(from_agent);
  TrustJson(w, trust, sig);
  if (selftest) {
    std::string out;
    int rc = Run({final_dir + "/bin/tvm-deploy", "selftest"}, &out);
    w.Key("selftest").BeginObject().Key("passed").Bool(rc == 0).Key("exit").Int(rc).Key("output").String(LastLines(out, 3)).EndObject();
    if (rc != 0) {
      throw StepError("selftest", "the selftest of " + m.bundle_id.substr(0, 12) + " failed on the device (exit " +
                                      std::to_string(rc) + "): " + LastLines(out, 3) + "; nothing was switched");
    }
  }
  w.EndObject();
  return 0;
}

void Switch(const Prefix& px, const std::string& id) {
  if (id.empty()) {
    if (unlink(px.Current().c_str()) != 0 && errno != ENOENT) throw StepError("switch", px.Current() + ": " + Err());
    return;
  }
  std::string tmp = px.Base() + "/.current.new";
  unlink(tmp.c_str());
  if (symlink(("releases/" + id).c_str(), tmp.c_str()) != 0 || rename(tmp.c_str(), px.Current().c_str()) != 0)
    throw StepError("switch", px.Current() + ": cannot switch (" + Err() + ")");
  // The release made current is the newest: rollback and gc order releases by this time.
  struct timespec now[2] = {{0, UTIME_NOW}, {0, UTIME_NOW}};
  utimensat(AT_FDCWD, px.Release(id).c_str(), now, AT_SYMLINK_NOFOLLOW);
}

// Copies the legacy layout's releases `ids` of bundle px.name into px's releases (hard links: no
// second copy on disk), each with the unit the host rendered for it (staging/<id>.<unit>), so that a
// rollback to them brings back a unit of the new layout; the legacy layout stays intact (its service
// keeps running) until the new one is healthy (RetireLegacy). With no current release yet, the legacy
// one becomes current. Returns the adopted ids.
std::vector<std::string> Adopt(const Prefix& px, const std::vector<std::string>& ids, const std::string& unit) {
  Prefix legacy = px.Legacy();
  std::vector<std::string> done;
  for (const std::string& id : ids) {
    if (!ValidId(id) || !IsFile(legacy.Release(id) + "/manifest.json"))
      throw StepError("adopt", "release '" + id + "' is not installed under " + legacy.Releases() + "; nothing was switched");
    ReleaseFacts f = ReadReleaseFacts(legacy.Release(id));
    if (f.name != px.name)
      throw StepError("adopt", "release " + id.substr(0, 12) + " is bundle '" + f.name + "', not '" + px.name + "'; nothing was switched");
    std::string staged = px.Staging() + "/" + id + "." + unit;
    if (IsFile(px.Release(id) + "/manifest.json")) {
      unlink(staged.c_str());
      continue;
    }
    if (!IsFile(staged)) throw StepError("adopt", staged + ": the unit for release " + id.substr(0, 12) + " was not staged; nothing was switched");
    std::string partial = px.Release(id) + ".partial";
    RemoveTree(partial);
    LinkTree(legacy.Release(id), partial);
    RemoveTree(partial + "/.deploy");
    MkdirP(partial + "/.deploy");
    WriteAtomic(partial + "/.deploy/" + unit, ReadText(staged), 0644);
    // Keep its age: releases are ordered by it (rollback picks the newest after current).
    struct stat st;
    if (stat(legacy.Release(id).c_str(), &st) == 0) {
      struct timespec t[2] = {st.st_mtim, st.st_mtim};
      utimensat(AT_FDCWD, partial.c_str(), t, 0);
    }
    if (rename(partial.c_str(), px.Release(id).c_str()) != 0) throw StepError("adopt", px.Release(id) + ": " + Err());
    unlink(staged.c_str());
    done.push_back(id);
  }
  std::string legacy_cur = CurrentId(legacy);
  if (CurrentId(px).empty() && !legacy_cur.empty() && IsFile(px.Release(legacy_cur) + "/manifest.json")) {
    struct stat st;
    bool have = stat(px.Release(legacy_cur).c_str(), &st) == 0;
    Switch(px, legacy_cur);
    if (have) {     // Switch marks it newest; it is, of the adopted ones, but keep the recorded time
      struct timespec t[2] = {st.st_mtim, st.st_mtim};
      utimensat(AT_FDCWD, px.Release(legacy_cur).c_str(), t, 0);
    }
  }
  return done;
}

// Whether the legacy layout's service serves bundle px.name (then this bundle's instance replaces it).
bool LegacyServes(const Prefix& px) {
  if (px.name.empty()) return false;
  std::string cur = CurrentId(px.Legacy());
  return !cur.empty() && ReadReleaseFacts(px.Legacy().Release(cur)).name == px.name;
}

// The legacy layout of bundle px.name, once its instance is healthy: its unit, its current link and
// the releases adopted into px (their files live on in px's copies and the store).
void RetireLegacy(const Prefix& px, const std::string& unit_dir, const Privileged& priv, json::Writer& w,
                  std::vector<std::string>* warnings) {
  Prefix legacy = px.Legacy();
  std::string out, legacy_unit = unit_dir + "/" + kDefaultUnit;
  if (IsFile(legacy_unit) || Exists(legacy_unit)) {
    if (priv.Run("retire", {"rm", "-f", legacy_unit}, &out) != 0)
      warnings->push_back("could not remove " + legacy_unit + ": " + LastLines(out, 1));
    priv.Run("retire", {"systemctl", "daemon-reload"}, &out);
  }
  unlink(legacy.Current().c_str());
  // Its releases of this bundle go: adopted ones live on in px, the others have no unit of the new
  // layout to come back with (and would hold their store files forever).
  w.Key("retired_legacy").BeginArray();
  for (const std::string& r : Releases(legacy)) {
    if (ReadReleaseFacts(legacy.Release(r)).name != px.name) continue;
    try {
      RemoveTree(legacy.Release(r));
      w.String(r);
    } catch (const std::exception& e) {
      warnings->push_back(e.what());
    }
  }
  w.EndArray();
  if (List(legacy.Releases()).empty()) rmdir(legacy.Releases().c_str());
}

int Activate(const std::vector<std::string>& args, json::Writer& w) {
  std::string prefix, name, id, unit_dir = "/etc/systemd/system", unit, health = "30", keep_s, trust_file;
  bool sudo = false;
  std::vector<std::string> protect, adopt;
  ArgParser("activate", args).Option("--prefix", &prefix).Option("--name", &name).Option("--release", &id)
      .Option("--unit-dir", &unit_dir).Option("--unit", &unit).Flag("--sudo", &sudo).Option("--health-timeout", &health)
      .Option("--keep", &keep_s).Option("--trust-file", &trust_file).Repeated("--protect", &protect)
      .Repeated("--adopt", &adopt).Require("--prefix").Require("--release").Parse();
  Prefix px = CheckedPrefix(prefix, name);
  if (unit.empty()) unit = px.Unit();
  if (!ValidUnitName(unit)) throw ArgError("--unit: '" + unit + "' is not a unit name (NAME.service)");
  if (!adopt.empty() && px.name.empty()) throw ArgError("activate: --adopt needs --name");
  double health_s = std::strtod(health.c_str(), nullptr);
  int keep = keep_s.empty() ? 0 : ParseInt("--keep", keep_s, 1);   // checked before anything changes
  if (id == "none") id.clear();
  else if (!ValidId(id) || !IsFile(px.Release(id) + "/manifest.json"))
    throw StepError("switch", "release '" + id + "' is not installed under " + px.Releases());
  // The release switched to is checked against the trust file as it is now, not as it was when the
  // release was installed: a key removed since then no longer lets its releases back (a rollback).
  Trust trust;
  SigCheck sig;
  if (!id.empty()) {
    const std::string nothing = "nothing was switched";
    trust = LoadTrust(trust_file.empty() ? kTrustFile : trust_file, !trust_file.empty(), nothing);
    std::string dir = px.Release(id);
    sig = CheckSignature(trust, ReadText(dir + "/manifest.json"), IsFile(dir + "/manifest.json.sig") ? dir + "/manifest.json.sig" : "",
                         nothing);
    RequireTrusted(trust, sig, "release " + id.substr(0, 12), nothing);
  }
  Privileged priv{sudo};
  std::vector<std::string> adopted = Adopt(px, adopt, unit);
  std::string previous = CurrentId(px);
  bool systemd = !Which("systemctl").empty();
  bool replaces_legacy = systemd && LegacyServes(px);
  std::vector<std::string> warnings;
  Begin(w, "activate");
  w.Key("previous");
  previous.empty() ? w.Null() : w.String(previous);
  w.Key("current");
  id.empty() ? w.Null() : w.String(id);
  w.Key("systemd").Bool(systemd);
  w.Key("adopted").BeginArray();
  for (const auto& a : adopted) w.String(a);
  w.EndArray();
  if (!id.empty()) TrustJson(w, trust, sig);
  if (id.empty()) {
    bool restore = systemd && LegacyServes(px) && IsFile(unit_dir + "/" + kDefaultUnit);
    if (systemd) {
      std::string out;
      priv.Run("stop", {"systemctl", "stop", unit}, &out);
    }
    Switch(px, "");
    if (restore) {
      // The first release of this bundle in the new layout failed, and nothing was adopted (an
      // Ansible role or a Mender module, which render no units for the old releases): the
      // single-service layout's service, still intact, serves again.
      std::string out;
      priv.Run("restart", {"systemctl", "enable", kDefaultUnit}, &out);
      priv.Check("restart", {"systemctl", "restart", kDefaultUnit});
    }
    w.Key("legacy_restored").Bool(restore).EndObject();
    return 0;
  }
  if (systemd) {
    // The release's own unit: a rollback gets back the unit its release was installed with.
    std::string src = px.Release(id) + "/.deploy/" + unit, dest = unit_dir + "/" + unit;
    if (IsFile(src)) {
      if (sudo && geteuid() != 0) {
        priv.Check("switch", {"install", "-D", "-m", "0644", src, dest});
      } else {
        try {
          MkdirP(unit_dir);
          WriteAtomic(dest, ReadText(src), 0644);
        } catch (const std::exception& e) {
          throw StepError("switch", std::string(e.what()) + "; installing the unit needs root (deploy with --sudo)");
        }
      }
    }
    priv.Check("switch", {"systemctl", "daemon-reload"});
    std::string out;
    priv.Run("switch", {"systemctl", "enable", unit}, &out);
  }
  Switch(px, id);
  if (systemd) {
    if (replaces_legacy) {
      // The legacy service serves this bundle (on its address): this instance takes over from it.
      std::string out;
      priv.Run("restart", {"systemctl", "disable", "--now", kDefaultUnit}, &out);
    }
    priv.Check("restart", {"systemctl", "restart", unit});
    std::string why;
    if (!WaitHealthy(px, health_s, &why)) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%g", health_s);
      throw StepError("health", std::string("no healthy answer within ") + buf + " s (" + (why.empty() ? "no reply" : why) + ")");
    }
    w.Key("healthy").Bool(true);
    if (replaces_legacy) RetireLegacy(px, unit_dir, priv, w, &warnings);
  } else {
    warnings.push_back("systemd not found: the service was not restarted and no health gate ran");
  }
  if (keep > 0) {
    std::set<std::string> prot(protect.begin(), protect.end());
    prot.insert(id);
    if (!previous.empty()) prot.insert(previous);
    // The new release is current and healthy: a failing prune only warns.
    try {
      GcResult g = CollectGarbage(px, keep, prot);
      w.Key("gc");
      GcJson(w, g);
    } catch (const std::exception& e) {
      warnings.push_back(std::string("pruning old releases failed: ") + e.what());
    }
  }
  w.Key("warnings").BeginArray();
  for (const auto& s : warnings) w.String(s);
  w.EndArray().EndObject();
  return 0;
}

int Gc(const std::vector<std::string>& args, json::Writer& w) {
  std::string prefix, name, keep = "3";
  std::vector<std::string> protect;
  ArgParser("gc", args).Option("--prefix", &prefix).Option("--name", &name).Option("--keep", &keep)
      .Repeated("--protect", &protect).Require("--prefix").Parse();
  Prefix px = CheckedPrefix(prefix, name);
  GcResult g = CollectGarbage(px, ParseInt("--keep", keep, 1), std::set<std::string>(protect.begin(), protect.end()));
  Begin(w, "gc");
  w.Key("gc");
  GcJson(w, g);
  w.EndObject();
  return 0;
}

// One bundle's releases, service state and health (the fields of `status --name N`).
void BundleStatus(json::Writer& w, const Prefix& px, const std::string& unit) {
  std::string cur = CurrentId(px);
  w.Key("current");
  cur.empty() ? w.Null() : w.String(cur);
  w.Key("unit").String(unit).Key("releases").BeginArray();
  for (const std::string& r : Releases(px)) {
    ReleaseFacts f = ReadReleaseFacts(px.Release(r));
    w.BeginObject().Key("id").String(r).Key("name").String(f.name).Key("board").String(f.board).Key("created").String(f.created)
        .Key("current").Bool(r == cur).EndObject();
  }
  w.EndArray();
  std::string service = "no systemd";
  if (!Which("systemctl").empty()) {
    std::string out;
    Run({"systemctl", "is-active", unit}, &out);
    service = LastLines(out, 1);
    if (service.empty()) service = "unknown";
  }
  std::string why;
  bool healthy = !cur.empty() && Probe(px, &why);
  w.Key("service").String(service).Key("healthy").Bool(healthy);
  if (!healthy && !why.empty()) w.Key("health_problem").String(why);
}

int Status(const std::vector<std::string>& args, json::Writer& w) {
  std::string prefix, name, unit;
  ArgParser("status", args).Option("--prefix", &prefix).Option("--name", &name).Option("--unit", &unit).Require("--prefix").Parse();
  Prefix px = CheckedPrefix(prefix, name);
  if (unit.empty()) unit = px.Unit();
  if (!ValidUnitName(unit)) throw ArgError("--unit: '" + unit + "' is not a unit name (NAME.service)");
  Begin(w, "status");
  w.Key("prefix").String(px.root);
  if (!name.empty()) {
    w.Key("name").String(name);
    BundleStatus(w, px, unit);
    w.EndObject();
    return 0;
  }
  // Every bundle of the device; the legacy layout's as one more, named after its current release.
  w.Key("bundles").BeginArray();
  for (const std::string& n : BundleNames(px)) {
    w.BeginObject().Key("name").String(n).Key("layout").String("bundles");
    BundleStatus(w, px.Named(n), px.Named(n).Unit());
    w.EndObject();
  }
  Prefix legacy = px.Legacy();
  std::string legacy_cur = CurrentId(legacy);
  if (!legacy_cur.empty() || !Releases(legacy).empty()) {
    w.BeginObject().Key("name").String(legacy_cur.empty() ? "?" : ReadReleaseFacts(legacy.Release(legacy_cur)).name)
        .Key("layout").String("legacy");
    BundleStatus(w, legacy, kDefaultUnit);
    w.EndObject();
  }
  w.EndArray().EndObject();
  return 0;
}

}  // namespace

void ArgParser::Parse() {
  for (size_t i = 0; i < args_.size(); ++i) {
    std::string a = args_[i], value;
    bool inline_value = false;
    if (a.rfind("--", 0) == 0 && a.find('=') != std::string::npos) {
      value = a.substr(a.find('=') + 1);
      a = a.substr(0, a.find('='));
      inline_value = true;
    }
    auto spec = std::find_if(specs_.begin(), specs_.end(), [&](const Spec& s) { return s.name == a; });
    if (spec == specs_.end()) {
      if (a.rfind("--", 0) == 0 || !positionals_) throw ArgError(cmd_ + ": unknown argument '" + args_[i] + "'");
      positionals_->push_back(args_[i]);
      continue;
    }
    spec->seen = true;
    if (spec->kind == kFlag) {
      if (inline_value) throw ArgError(cmd_ + ": " + a + " takes no value");
      *static_cast<bool*>(spec->out) = true;
      continue;
    }
    if (!inline_value) {
      if (i + 1 >= args_.size()) throw ArgError(cmd_ + ": " + a + " needs a value");
      value = args_[++i];
    }
    if (spec->kind == kOption) *static_cast<std::string*>(spec->out) = value;
    else static_cast<std::vector<std::string>*>(spec->out)->push_back(value);
  }
  for (const std::string& r : required_) {
    auto spec = std::find_if(specs_.begin(), specs_.end(), [&](const Spec& s) { return s.name == r; });
    if (spec == specs_.end() || !spec->seen) throw ArgError(cmd_ + ": " + r + " is required");
  }
}

int ParseInt(const std::string& flag, const std::string& value, int lo, int hi) {
  char* end = nullptr;
  long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || v < lo || v > hi)
    throw ArgError(flag + ": expected an integer from " + std::to_string(lo) + " to " + std::to_string(hi) + ", got '" + value + "'");
  return int(v);
}

std::string SafeRelativePath(const std::string& rel, std::string* why) {
  if (rel.empty()) return *why = "it is empty", "";
  if (rel[0] == '/') return *why = "it is absolute", "";
  if (rel.find('\0') != std::string::npos) return *why = "it contains a NUL byte", "";
  std::vector<std::string> parts;
  std::stringstream ss(rel);
  std::string part;
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;                              // "a//b" is "a/b"
    if (part == "..") return *why = "it leaves the release folder (a '..' component)", "";
    if (part == ".") return *why = "it contains a '.' component", "";
    parts.push_back(part);
  }
  if (parts.empty()) return *why = "it names no file", "";
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : "/") + p;
  return out;
}

std::string Sha256File(const std::string& path, std::string* why) {
  int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW);
  if (fd < 0) return *why = path + ": " + Err(), "";
  Sha256 h;
  std::vector<uint8_t> buf(1 << 16);
  ssize_t n;
  while ((n = read(fd, buf.data(), buf.size())) > 0 || (n < 0 && errno == EINTR))
    if (n > 0) h.Update(buf.data(), size_t(n));
  close(fd);
  if (n < 0) return *why = path + ": " + Err(), "";
  return h.HexDigest();
}

bool IsDeviceCommand(const std::string& cmd) {
  return cmd == "survey" || cmd == "prepare" || cmd == "install" || cmd == "activate" || cmd == "gc" || cmd == "status";
}

int DeviceCommand(const std::string& cmd, const std::vector<std::string>& args) {
  json::Writer w;
  int rc = 0;
  try {
    if (cmd == "survey") rc = Survey(args, w);
    else if (cmd == "prepare") rc = Prepare(args, w);
    else if (cmd == "install") rc = Install(args, w);
    else if (cmd == "activate") rc = Activate(args, w);
    else if (cmd == "gc") rc = Gc(args, w);
    else rc = Status(args, w);
  } catch (const ArgError&) {
    throw;                                          // usage: main prints it, exit 2
  } catch (const StepError& e) {
    json::Writer f;
    f.BeginObject().Key("ok").Bool(false).Key("command").String(cmd).Key("step").String(e.step).Key("error").String(e.what()).EndObject();
    std::cout << f.str() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    json::Writer f;
    f.BeginObject().Key("ok").Bool(false).Key("command").String(cmd).Key("step").String(cmd == "activate" ? "switch" : cmd)
        .Key("error").String(e.what()).EndObject();
    std::cout << f.str() << std::endl;
    return 1;
  }
  std::cout << w.str() << std::endl;
  return rc;
}

}  // namespace tvmbundle
