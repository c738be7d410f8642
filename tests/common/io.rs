//! Small I/O helpers shared by the test crates.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Copies `len` bytes from `src` at `off_in` to `dst` at `off_out` with
/// copy_file_range(2), looping over short copies.
pub fn copy_range(src: &File, off_in: u64, dst: &File, off_out: u64, len: usize) {
    let (mut off_in, mut off_out) = (off_in as i64, off_out as i64);
    let mut left = len;
    while left > 0 {
        // SAFETY: valid fds and offsets owned by the caller.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
}
