//! The test VM for IPVS tests: the host kernel has neither IPVS nor dummy
//! links, so these tests boot Debian's kernel under virtme-ng. The harness
//! lives in `tests/vm-runner` so that `modes/ipvs` can use it too.

#![allow(unused_imports)]

pub use kproxy_vm_runner::{
    IN_VM_ENV, VmOptions, VmOutput, VmTools, in_vm_or_skip, run_ignored_tests_in_vm, run_in_vm,
    run_in_vm_with, vm_available, vm_or_skip,
};
