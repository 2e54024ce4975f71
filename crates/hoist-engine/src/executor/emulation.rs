//! Foreign platforms: whether a step for another architecture can run here, through a
//! qemu-user interpreter registered with binfmt_misc.

use std::fs;
use std::path::Path;

use crate::graph::Platform;

use super::ExecError;

const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// Ok when steps for `platform` can run on this machine: natively (the host architecture,
/// or 386 on amd64), or through a qemu-user binfmt_misc handler that is enabled and has the
/// F (fix binary) flag, without which the interpreter would have to exist inside each rootfs.
pub fn check_emulation(platform: &Platform) -> Result<(), ExecError> {
    check_emulation_in(Path::new(BINFMT_DIR), platform, &Platform::host())
}

/// The qemu name of an OCI architecture (`arm64` → `aarch64`).
pub fn qemu_arch(oci_arch: &str) -> Option<&'static str> {
    Some(match oci_arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "arm" => "arm",
        "386" => "i386",
        "ppc64le" => "ppc64le",
        "ppc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64le" => "mips64el",
        "mips64" => "mips64",
        "mipsle" => "mipsel",
        "mips" => "mips",
        "loong64" => "loongarch64",
        _ => return None,
    })
}

pub(crate) fn check_emulation_in(binfmt: &Path, platform: &Platform, host: &Platform) -> Result<(), ExecError> {
    let fail = |reason: String| ExecError::Emulation { platform: platform.to_string(), reason };
    if platform.os != "linux" {
        return Err(fail(format!("only linux steps can run on this builder, not {}", platform.os)));
    }
    if platform.architecture == host.architecture || (host.architecture == "amd64" && platform.architecture == "386") {
        return Ok(());
    }
    let Some(qarch) = qemu_arch(&platform.architecture) else {
        return Err(fail(format!("unknown architecture {:?}", platform.architecture)));
    };
    let not_registered = || {
        fail(format!(
            "qemu-user binfmt emulation for {qarch} is not registered; install qemu-user-static / binfmt-support \
             (or run `docker run --privileged --rm tonistiigi/binfmt --install {}`)",
            platform.architecture
        ))
    };
    if fs::read_to_string(binfmt.join("status")).is_ok_and(|s| s.trim() == "disabled") {
        return Err(fail(format!("binfmt_misc is disabled (echo 1 > {}/status)", binfmt.display())));
    }
    let entry = find_handler(binfmt, qarch).ok_or_else(not_registered)?;
    let text = fs::read_to_string(&entry).map_err(|_| not_registered())?;
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("enabled") {
        return Err(fail(format!(
            "the qemu-user binfmt handler {} is registered but disabled (echo 1 > {})",
            entry.display(),
            entry.display()
        )));
    }
    let flags = text.lines().find_map(|l| l.strip_prefix("flags:")).unwrap_or("").trim().to_string();
    if !flags.contains('F') {
        return Err(fail(format!(
            "the qemu-user binfmt handler {} lacks the F (fix binary) flag, so its interpreter cannot be \
             found inside containers; re-register it with the F flag (qemu-user-static does)",
            entry.display()
        )));
    }
    Ok(())
}

/// `qemu-<arch>`, or any handler whose interpreter is a qemu for that architecture.
fn find_handler(binfmt: &Path, qarch: &str) -> Option<std::path::PathBuf> {
    let named = binfmt.join(format!("qemu-{qarch}"));
    if named.is_file() {
        return Some(named);
    }
    let mut entries: Vec<_> = fs::read_dir(binfmt).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    entries.into_iter().find(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "register" || name == "status" {
            return false;
        }
        fs::read_to_string(p).is_ok_and(|t| {
            t.lines().filter_map(|l| l.strip_prefix("interpreter ")).any(|i| {
                let base = i.rsplit('/').next().unwrap_or(i);
                base == format!("qemu-{qarch}") || base == format!("qemu-{qarch}-static") || base.starts_with(&format!("{qarch}-binfmt"))
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd64() -> Platform {
        Platform::parse("linux/amd64").unwrap()
    }

    fn arm64() -> Platform {
        Platform::parse("linux/arm64").unwrap()
    }

    fn binfmt(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("status"), "enabled\n").unwrap();
        fs::write(t.path().join("register"), "").unwrap();
        for (name, body) in entries {
            fs::write(t.path().join(name), body).unwrap();
        }
        t
    }

    const GOOD: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n";

    #[test]
    fn host_architecture_needs_no_emulation() {
        let t = binfmt(&[]);
        check_emulation_in(t.path(), &amd64(), &amd64()).unwrap();
        check_emulation_in(t.path(), &Platform::parse("linux/386").unwrap(), &amd64()).unwrap();
    }

    #[test]
    fn registered_handler_with_fix_binary_flag_is_accepted() {
        let t = binfmt(&[("qemu-aarch64", GOOD)]);
        check_emulation_in(t.path(), &arm64(), &amd64()).unwrap();
    }

    #[test]
    fn handler_under_another_name_is_found_by_interpreter() {
        let t = binfmt(&[("arm64-handler", "enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: F\n")]);
        check_emulation_in(t.path(), &arm64(), &amd64()).unwrap();
    }

    #[test]
    fn missing_handler_says_what_to_install() {
        let t = binfmt(&[]);
        let e = check_emulation_in(t.path(), &arm64(), &amd64()).unwrap_err().to_string();
        assert!(e.starts_with("cannot run linux/arm64 steps: qemu-user binfmt emulation"), "{e}");
        assert!(e.contains("install qemu-user-static / binfmt-support"), "{e}");
    }

    #[test]
    fn disabled_handler_and_missing_f_flag_are_reported() {
        let t = binfmt(&[("qemu-aarch64", &GOOD.replace("enabled", "disabled"))]);
        let e = check_emulation_in(t.path(), &arm64(), &amd64()).unwrap_err().to_string();
        assert!(e.contains("registered but disabled"), "{e}");
        let t = binfmt(&[("qemu-aarch64", &GOOD.replace("POF", "P"))]);
        let e = check_emulation_in(t.path(), &arm64(), &amd64()).unwrap_err().to_string();
        assert!(e.contains("F (fix binary) flag"), "{e}");
    }

    #[test]
    fn non_linux_and_unknown_architectures_are_refused() {
        let t = binfmt(&[]);
        assert!(check_emulation_in(t.path(), &Platform::parse("windows/amd64").unwrap(), &amd64()).is_err());
        let e = check_emulation_in(t.path(), &Platform::parse("linux/vax").unwrap(), &amd64()).unwrap_err().to_string();
        assert!(e.contains("unknown architecture"), "{e}");
    }

    #[test]
    fn this_machine_can_run_its_own_platform() {
        check_emulation(&Platform::host()).unwrap();
    }
}
