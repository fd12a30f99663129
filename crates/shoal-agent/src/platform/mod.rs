//! The host's own interfaces, read and written through their files:
//! CPU cgroups (DPS shares and the emulated hosts' capacity).

pub mod cgroup;
