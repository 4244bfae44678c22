//! Sees what hyper hides: whether an HTTP/1 request head carried both `Content-Length` and
//! `Transfer-Encoding` (docs/spec.md §5, body framing).
//!
//! hyper frames such a request by `Transfer-Encoding`, removes `Content-Length` before the
//! service sees the request and closes the connection after answering (RFC 9112 §6.3). That
//! defeats smuggling through the sidecar, but the request is still served, and a hop in front
//! of the sidecar that framed it by `Content-Length` has already disagreed with us about where
//! it ends. The sidecar refuses it instead (400, connection closed, as Envoy does), so it needs
//! the fact hyper drops: [`HeadScan`] reads the head's bytes as they arrive on the socket.
//!
//! Invariants: constant memory per connection (no buffering: a state machine over the bytes,
//! keeping at most the first 17 bytes of a header name); it only reads, never changes, the
//! bytes hyper gets; it follows a head only while no request is in flight, the same rule the
//! header timeout uses ([`super::conn`]), and drops it when one starts. A head it does not scan
//! (a pipelined request that arrived in the same read as the one before) yields no verdict,
//! which leaves hyper's own handling. It can only be misled by request-body bytes that arrive
//! while no request is in flight (hyper answered before the upload ended and kept the
//! connection) and that hold a `Content-Length:` line: then the next request on that
//! connection, if it has `Transfer-Encoding`, is refused with 400.

/// The longest header name the scan compares: `transfer-encoding`.
const NAME_MAX: usize = 17;

/// A streaming scan of one request head.
#[derive(Debug, Default)]
pub(crate) struct HeadScan {
    /// A head is being scanned.
    active: bool,
    /// Still on the request line (or on blank lines before it, which parsers skip).
    request_line: bool,
    /// Bytes on the current line, CR not counted.
    line_len: usize,
    /// Lowercased start of the current line's header name.
    name: [u8; NAME_MAX],
    name_len: usize,
    /// Still before the current line's `:`.
    in_name: bool,
    /// The name is longer than [`NAME_MAX`], so it is neither of the two.
    name_too_long: bool,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    /// Feeds bytes just read from the socket. `between_requests` says whether a new head may
    /// start here (no request in flight). Returns the verdict when these bytes complete a head:
    /// `Some(true)` when it carried both `Content-Length` and `Transfer-Encoding`.
    pub(crate) fn feed(&mut self, bytes: &[u8], between_requests: bool) -> Option<bool> {
        if !between_requests {
            // hyper has a request in flight, so any head this scan was following has ended (or
            // it was never a head): start afresh with the next one.
            self.active = false;
            return None;
        }
        if !self.active {
            *self = HeadScan {
                active: true,
                request_line: true,
                ..HeadScan::default()
            };
        }
        for &b in bytes {
            match b {
                b'\n' if self.line_len == 0 && !self.request_line => {
                    self.active = false;
                    return Some(self.content_length && self.transfer_encoding);
                }
                b'\n' => {
                    if self.line_len > 0 {
                        self.request_line = false;
                    }
                    self.line_len = 0;
                    self.name_len = 0;
                    self.in_name = !self.request_line;
                    self.name_too_long = false;
                }
                b'\r' => {}
                _ => {
                    self.line_len += 1;
                    if self.in_name {
                        self.name_byte(b);
                    }
                }
            }
        }
        None
    }

    fn name_byte(&mut self, b: u8) {
        if b == b':' {
            self.in_name = false;
            if !self.name_too_long {
                match &self.name[..self.name_len] {
                    b"content-length" => self.content_length = true,
                    b"transfer-encoding" => self.transfer_encoding = true,
                    _ => {}
                }
            }
        } else if self.name_len < NAME_MAX {
            self.name[self.name_len] = b.to_ascii_lowercase();
            self.name_len += 1;
        } else {
            self.name_too_long = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(chunks: &[&[u8]]) -> Option<bool> {
        let mut s = HeadScan::default();
        chunks.iter().find_map(|c| s.feed(c, true))
    }

    #[test]
    fn both_framing_headers_are_seen_in_any_order_case_and_split() {
        let cl_te = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nbody";
        assert_eq!(verdict(&[cl_te]), Some(true));
        assert_eq!(
            verdict(&[
                b"POST /x HTTP/1.1\r\ntransfer-ENCODING: chunked\r\nCONTENT-length: 5\r\n\r\n"
            ]),
            Some(true)
        );
        // Byte by byte.
        let chunks: Vec<&[u8]> = cl_te.chunks(1).collect();
        assert_eq!(verdict(&chunks), Some(true));
        // Bare LF line endings, and blank lines before the request line.
        assert_eq!(
            verdict(&[
                b"\r\n\nPOST /x HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n"
            ]),
            Some(true)
        );
    }

    #[test]
    fn one_framing_header_or_look_alikes_are_not_a_conflict() {
        for head in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /content-length:transfer-encoding: HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length-X: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nX-A: Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encodingx: chunked\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(
                verdict(&[head]),
                Some(false),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // Body bytes after the head are not read as headers.
        assert_eq!(
            verdict(&[
                b"POST /x HTTP/1.1\r\nContent-Length: 40\r\n\r\nTransfer-Encoding: chunked\r\n\r\n"
            ]),
            Some(false)
        );
        // An incomplete head has no verdict yet.
        assert_eq!(
            verdict(&[b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n"]),
            None
        );
    }

    #[test]
    fn a_head_starts_only_between_requests() {
        let mut s = HeadScan::default();
        assert_eq!(
            s.feed(
                b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            None
        );
        // A head split over reads is followed to its end.
        assert_eq!(
            s.feed(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\n", true),
            None
        );
        assert_eq!(
            s.feed(b"Transfer-Encoding: chunked\r\n\r\n", true),
            Some(true)
        );
        // A request in flight ends a scan that lost step (bytes that were not a head).
        assert_eq!(s.feed(b"body bytes\r\nContent-Length: 1\r\n", true), None);
        assert_eq!(s.feed(b"more body", false), None);
        assert_eq!(
            s.feed(
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                true
            ),
            Some(false)
        );
        // The next head is a new scan.
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\n\r\n", true), Some(false));
    }
}
