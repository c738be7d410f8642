//! `O_DIRECT` on the backing side. When the application opens a file with `O_DIRECT`
//! (InnoDB data files), the backing file is opened with `O_DIRECT` too, so the data is
//! cached once (in the buffer pool), as on a plain directory. The kernel hands us payloads
//! at arbitrary memory addresses (over /dev/fuse; the io_uring transport's are
//! page-aligned and written as they are), so I/O goes through a per-thread aligned
//! bounce buffer; a request whose offset or length is not block-aligned, which
//! `O_DIRECT` on the backing file would refuse, goes through a buffered fd on the same
//! file instead.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use crate::sys::{self, Errno, SysResult};

/// Offsets and lengths must be multiples of this for the direct path.
pub const BLOCK: u64 = 512;
const MEMORY_ALIGN: usize = 4096;

/// The direct-I/O state of one open file.
pub struct DirectFile {
    /// Opened on first need, for requests the direct path cannot take.
    buffered: OnceLock<OwnedFd>,
}

impl DirectFile {
    pub fn new() -> DirectFile {
        DirectFile {
            buffered: OnceLock::new(),
        }
    }

    /// The buffered fd, opened by `open` the first time.
    pub fn buffered<E>(
        &self,
        open: impl FnOnce() -> Result<OwnedFd, E>,
    ) -> Result<BorrowedFd<'_>, E> {
        use std::os::fd::AsFd;
        if let Some(fd) = self.buffered.get() {
            return Ok(fd.as_fd());
        }
        let fd = open()?;
        Ok(self.buffered.get_or_init(|| fd).as_fd())
    }
}

impl Default for DirectFile {
    fn default() -> Self {
        Self::new()
    }
}

pub fn aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(BLOCK) && (len as u64).is_multiple_of(BLOCK)
}

struct Bounce {
    ptr: *mut u8,
    cap: usize,
}

impl Bounce {
    const fn empty() -> Bounce {
        Bounce {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        if self.cap < len {
            self.release();
            let cap = len.next_multiple_of(MEMORY_ALIGN).max(MEMORY_ALIGN);
            let layout = Layout::from_size_align(cap, MEMORY_ALIGN).expect("valid layout");
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(
                !ptr.is_null(),
                "out of memory for a {cap}-byte bounce buffer"
            );
            self.ptr = ptr;
            self.cap = cap;
        }
        // SAFETY: `ptr` is valid for `cap >= len` initialized bytes, owned by this thread.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            let layout = Layout::from_size_align(self.cap, MEMORY_ALIGN).expect("valid layout");
            // SAFETY: `ptr` was allocated with exactly this layout.
            unsafe { dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        self.release();
    }
}

thread_local! {
    static BOUNCE: RefCell<Bounce> = const { RefCell::new(Bounce::empty()) };
}

/// Reads `buf.len()` bytes at `offset` with `O_DIRECT` (both must be aligned); returns
/// the count, short at end of file.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    if (buf.as_ptr() as usize).is_multiple_of(MEMORY_ALIGN) {
        return sys::pread_full(fd, buf, offset);
    }
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let bounce = b.slice(buf.len());
        let n = sys::pread_full(fd, bounce, offset)?;
        buf[..n].copy_from_slice(&bounce[..n]);
        Ok(n)
    })
}

/// Writes `data` at `offset` with `O_DIRECT` (both must be aligned). A payload that
/// already lies on a page boundary (the io_uring transport's buffers) goes as it is.
pub fn pwrite(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> SysResult<usize> {
    if (data.as_ptr() as usize).is_multiple_of(MEMORY_ALIGN) {
        return sys::pwrite_full(fd, data, offset);
    }
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let bounce = b.slice(data.len());
        bounce.copy_from_slice(data);
        sys::pwrite_full(fd, bounce, offset)
    })
}

/// True for the errno a filesystem gives when it refuses an `O_DIRECT` request.
pub fn refused(e: Errno) -> bool {
    e == Errno::EINVAL
}
