//! Building blocks shared by the XDP programs (`lb-balancer`, `lb-decap`): wire-format
//! headers, bounds-checked packet access, checksums and next-hop lookup. Maps live with the
//! program that owns them. Everything here is `#[inline(always)]`: BPF-to-BPF calls would cost
//! more than the code they wrap.
#![no_std]

pub mod csum;
pub mod headers;
pub mod packet;
pub mod route;
