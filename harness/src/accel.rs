//! Choosing QEMU's accelerator: KVM only when a probe proves that a vCPU really runs.
//!
//! A `/dev/kvm` that opens is not enough (nested set-ups exist where it opens and guests
//! hang), so the probe creates a VM with one vCPU, runs three real-mode instructions that end
//! in `hlt`, and accepts KVM only if the vCPU exits with `Hlt` and the right register value
//! within a time-out. Anything else means TCG.

use std::sync::mpsc;
use std::time::Duration;

/// The accelerator a guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// How much slower than KVM guests run (time-outs are multiplied by this).
    pub fn slowness(self) -> u32 {
        match self {
            Accel::Kvm => 1,
            Accel::Tcg => 10,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The probe's verdict: KVM works, or why not.
pub fn probe_kvm(limit: Duration) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    // The vCPU thread is detached: if KVM_RUN never returns, the thread is left behind and
    // ends with the process.
    std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(run_probe());
        })
        .map_err(|e| format!("cannot start the probe thread: {e}"))?;
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(format!("a KVM vCPU did not reach HLT within {limit:?}")),
    }
}

fn run_probe() -> Result<(), String> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    check_cpuid(&kvm)?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    const SIZE: usize = 0x1000;
    const ADDR: u64 = 0x1000;
    // SAFETY: an anonymous private mapping, not aliasing anything; checked for failure below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap of probe memory failed".into());
    }
    // mov ax, 2; add ax, 3; hlt (16-bit real mode)
    let code = [0xb8u8, 0x02, 0x00, 0x05, 0x03, 0x00, 0xf4];
    // SAFETY: mem is a fresh SIZE-byte writable mapping and code is shorter than SIZE.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: ADDR,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping stays valid for the rest of the process (it is never unmapped), so
    // the guest memory region never points at freed memory.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = ADDR;
    regs.rax = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    match vcpu.run() {
        Ok(VcpuExit::Hlt) => {}
        Ok(other) => return Err(format!("the KVM vCPU exited with {other:?} instead of HLT")),
        Err(e) => return Err(format!("KVM_RUN: {e}")),
    }
    let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    if regs.rax & 0xffff != 5 {
        return Err(format!(
            "the KVM vCPU computed {} instead of 5",
            regs.rax & 0xffff
        ));
    }
    Ok(())
}

/// Checks that KVM offers the CPU features every x86-64 distribution kernel relies on: a
/// KVM that cannot pass through SSE3 or long mode is an emulation layer on which guests
/// hang (seen on nested set-ups that run the HLT probe fine).
fn check_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<(), String> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let leaf = |f: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == f && e.index == 0)
            .copied()
    };
    let mut missing = Vec::new();
    match leaf(1) {
        Some(l) => {
            for (bit, name) in [
                (0, "sse3"),
                (9, "ssse3"),
                (13, "cx16"),
                (19, "sse4.1"),
                (23, "popcnt"),
            ] {
                if l.ecx & (1 << bit) == 0 {
                    missing.push(name);
                }
            }
            for (bit, name) in [
                (0, "fpu"),
                (4, "tsc"),
                (5, "msr"),
                (6, "pae"),
                (8, "cx8"),
                (9, "apic"),
                (15, "cmov"),
                (25, "sse"),
                (26, "sse2"),
            ] {
                if l.edx & (1 << bit) == 0 {
                    missing.push(name);
                }
            }
        }
        None => missing.push("leaf 1"),
    }
    match leaf(0x8000_0001) {
        Some(l) if l.edx & (1 << 29) != 0 => {}
        _ => missing.push("lm"),
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "KVM does not offer the CPU features {}",
            missing.join(", ")
        ))
    }
}

/// What `--accel` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if the probe proves it works, else TCG.
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
}

/// Chooses the accelerator and says why.
pub fn choose(choice: AccelChoice) -> (Accel, String) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, "forced by --accel kvm".into()),
        AccelChoice::Tcg => (Accel::Tcg, "forced by --accel tcg".into()),
        AccelChoice::Auto => match probe_kvm(Duration::from_millis(1500)) {
            Ok(()) => (Accel::Kvm, "KVM probe ran a vCPU to HLT".into()),
            Err(e) => (Accel::Tcg, format!("KVM unusable: {e}")),
        },
    }
}
