//! The cross-compiled camera binary (scripts/build-aarch64.sh) is a 64-bit little-endian
//! aarch64 ELF for glibc's aarch64 loader. Ignored in `scripts/test.sh`: the aarch64 build
//! and its sysroot are made by `scripts/test-aarch64.sh`, which runs these with --ignored; a
//! missing binary fails them rather than passing.

use std::path::{Path, PathBuf};

/// ELF e_machine values (System V gABI).
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// What the checks below need from an ELF header and its program headers.
#[derive(Debug)]
struct ElfInfo {
    class64: bool,
    little_endian: bool,
    machine: u16,
    interpreter: Option<String>,
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads a 64-bit little-endian ELF (the only kind both our targets produce).
fn read_elf(path: &Path) -> ElfInfo {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        b.len() >= 64 && &b[..4] == b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    let (class64, little_endian) = (b[4] == 2, b[5] == 1);
    let machine = u16_le(&b, 18);
    let mut interpreter = None;
    if class64 && little_endian {
        let (phoff, phentsize, phnum) = (u64_le(&b, 32) as usize, u16_le(&b, 54), u16_le(&b, 56));
        for i in 0..phnum as usize {
            let ph = phoff + i * phentsize as usize;
            // PT_INTERP: the path of the dynamic loader, NUL-terminated
            if u32_le(&b, ph) == 3 {
                let (off, size) = (u64_le(&b, ph + 8) as usize, u64_le(&b, ph + 32) as usize);
                let s = &b[off..off + size];
                interpreter =
                    Some(String::from_utf8_lossy(s.split(|&c| c == 0).next().unwrap()).into());
            }
        }
    }
    ElfInfo {
        class64,
        little_endian,
        machine,
        interpreter,
    }
}

fn aarch64_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("aarch64-unknown-linux-gnu/release/fhecam")
}

#[test]
#[ignore = "needs the aarch64 build: run scripts/test-aarch64.sh"]
fn aarch64_binary_is_an_aarch64_elf() {
    let path = aarch64_binary();
    assert!(
        path.is_file(),
        "{} is missing: build it with scripts/build-aarch64.sh",
        path.display()
    );
    let elf = read_elf(&path);
    assert!(elf.class64 && elf.little_endian, "{elf:?}");
    assert_eq!(elf.machine, EM_AARCH64, "not an aarch64 binary: {elf:?}");
    assert_eq!(
        elf.interpreter.as_deref(),
        Some("/lib/ld-linux-aarch64.so.1"),
        "not linked for glibc's aarch64 loader"
    );
}

/// The reader itself, on a binary whose architecture is known: the one running this test.
#[test]
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn elf_reader_recognises_the_native_test_binary() {
    let elf = read_elf(&std::env::current_exe().unwrap());
    assert!(elf.class64 && elf.little_endian);
    assert_eq!(elf.machine, EM_X86_64);
    assert_ne!(elf.machine, EM_AARCH64);
    assert_eq!(
        elf.interpreter.as_deref(),
        Some("/lib64/ld-linux-x86-64.so.2")
    );
}
