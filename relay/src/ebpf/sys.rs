//! Raw `bpf(2)` map element calls on a borrowed map descriptor. Workers use these for the
//! session mirror and the blocklist: no allocation, no lock, usable from any thread (the
//! kernel serialises updates of one element).

use std::io;
use std::os::fd::RawFd;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub const BPF_ANY: u64 = 0;

/// The `bpf_attr` variant of the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn call(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix for this command; the
    // pointers in it refer to live values of the map's key and value sizes (callers' job).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut ElemAttr, std::mem::size_of::<ElemAttr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// # Safety
/// `K` and `V` must be exactly the map's key and value types.
pub unsafe fn update<K, V>(fd: RawFd, key: &K, value: &V, flags: u64) -> io::Result<()> {
    let mut a = ElemAttr {
        map_fd: fd as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
        ..Default::default()
    };
    call(BPF_MAP_UPDATE_ELEM, &mut a)
}

/// # Safety
/// `K` and `V` must be exactly the map's key and value types (not a per-CPU map).
pub unsafe fn lookup<K, V: Default>(fd: RawFd, key: &K) -> Option<V> {
    let mut v = V::default();
    let mut a = ElemAttr { map_fd: fd as u32, key: key as *const K as u64, value: &mut v as *mut V as u64, ..Default::default() };
    call(BPF_MAP_LOOKUP_ELEM, &mut a).ok().map(|_| v)
}

/// # Safety
/// `K` must be exactly the map's key type.
pub unsafe fn delete<K>(fd: RawFd, key: &K) -> io::Result<()> {
    let mut a = ElemAttr { map_fd: fd as u32, key: key as *const K as u64, ..Default::default() };
    call(BPF_MAP_DELETE_ELEM, &mut a)
}
