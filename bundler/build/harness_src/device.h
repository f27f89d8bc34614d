// The device side of a deploy, as tvm-deploy subcommands (the host ships them in the bundle's own
// harness, the way Ansible ships its modules): each takes argv and prints one JSON document.
//
//   survey   --prefix P [--name N] [--unit-dir U] [--sudo] [--want SHA]...   every fact preflight needs
//   prepare  --prefix P [--name N] [--sudo]                       create the layout (through sudo: chown)
//   install  --prefix P [--name N] --manifest M|--release DIR [--unit FILE] [--from DIR] [--selftest]
//            [--signature SIG] [--trust-file F]
//   activate --prefix P [--name N] --release ID|none [--unit-dir U] [--unit NAME] [--sudo]
//            [--health-timeout S] [--keep N] [--protect ID]... [--adopt ID]... [--trust-file F]
//   gc       --prefix P [--name N] --keep N [--protect ID]...
//   status   --prefix P [--name N] [--unit NAME]
//
// Layout under P (bundler/package/layout.py): store/sha256/<hex> (files by content, shared by every
// bundle), staging/ (uploads: <sha>.part, <id>.manifest.json, <id>.<unit>), and per bundle name N
// bundles/N/releases/<id>/ (store files hard-linked into the bundle's layout, plus manifest.json and
// .deploy/<unit>), bundles/N/current -> releases/<id>, unit tvmbundle@N.service. Without --name the
// commands act on the single-service layout of tvmbundle 0.1 (P/releases, P/current, tvmbundle.service),
// which `activate --name N --adopt ID...` takes over when it serves bundle N: its releases are hard-linked
// into bundles/N with the units the host staged for them, its service is stopped when N's instance
// starts, and it is removed once that instance is healthy.
// Signed releases: when the trust file (default /etc/tvmbundle/allowed_signers, root's, 0644; an
// OpenSSH allowed_signers file) lists a key, install requires manifest.json.sig (--signature SIG, else
// M.sig beside the manifest, DIR/manifest.json.sig for --release) to be a valid `ssh-keygen -Y sign -n
// tvmbundle-manifest` signature of the manifest by one of its keys, checked before anything is stored
// and kept as releases/<id>/manifest.json.sig; activate re-checks the release against the file as it
// is then. A refusal is step "signature". Without the file unsigned releases are allowed; install and
// activate report "signed" and "signed_by" either way.
// Exit codes: 0 ok, 1 the step failed or was refused (the JSON says why: "ok": false, "step",
// "error"), 2 usage.
#ifndef TVMBUNDLE_DEVICE_H_
#define TVMBUNDLE_DEVICE_H_

#include <stdexcept>
#include <string>
#include <vector>

namespace tvmbundle {

// A usage error (unknown option, missing value): tvm-deploy prints it and exits 2.
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The one argument parser of every subcommand: flags (--json), options with a value (--prefix P or
// --prefix=P), repeated options (--want A --want B) and, where a command takes them, positionals.
// Unknown options and missing values throw ArgError naming the command.
class ArgParser {
 public:
  ArgParser(std::string command, std::vector<std::string> args) : cmd_(std::move(command)), args_(std::move(args)) {}
  ArgParser& Flag(const std::string& name, bool* out) { return Add(name, kFlag, out); }
  ArgParser& Option(const std::string& name, std::string* out) { return Add(name, kOption, out); }
  ArgParser& Repeated(const std::string& name, std::vector<std::string>* out) { return Add(name, kRepeated, out); }
  ArgParser& Positionals(std::vector<std::string>* out) { positionals_ = out; return *this; }
  ArgParser& Require(const std::string& name) { required_.push_back(name); return *this; }
  void Parse();

 private:
  enum Kind { kFlag, kOption, kRepeated };
  struct Spec { std::string name; Kind kind; void* out; bool seen = false; };
  ArgParser& Add(const std::string& name, Kind kind, void* out) { specs_.push_back({name, kind, out}); return *this; }
  std::string cmd_;
  std::vector<std::string> args_;
  std::vector<Spec> specs_;
  std::vector<std::string> required_;
  std::vector<std::string>* positionals_ = nullptr;
};

// An integer option's value in [lo, hi], or ArgError naming the option.
int ParseInt(const std::string& flag, const std::string& value, int lo, int hi = 1000000);

bool IsDeviceCommand(const std::string& cmd);
int DeviceCommand(const std::string& cmd, const std::vector<std::string>& args);

// The relative path `rel` of a manifest entry normalised, or "" with *why when it is absolute,
// empty, contains '.' or '..' components or otherwise would leave the release folder.
std::string SafeRelativePath(const std::string& rel, std::string* why);

// Lower-case hex SHA-256 of a file's content; "" with *why on a read error.
std::string Sha256File(const std::string& path, std::string* why);

}  // namespace tvmbundle

#endif  // TVMBUNDLE_DEVICE_H_
