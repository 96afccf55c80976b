//! Accepting any `:authority` on the server side.
//!
//! gRPC clients other than Go's send the unix socket's path as the HTTP/2 `:authority`
//! (gRPC core, so Python, Ruby and C++, sends it percent-encoded, e.g. `tmp%2Fcsi.sock`;
//! grpc-java sends it raw). The `h2` crate under tonic refuses any request whose authority
//! is not a valid URI authority and resets the stream with PROTOCOL_ERROR before our code
//! sees it; the client reports INTERNAL "RST_STREAM". h2 has no switch for this.
//!
//! CSI never looks at the authority, so this wrapper sits between the socket and the
//! server and removes an authority h2 would refuse (a request without one is valid
//! HTTP/2). Header blocks are HPACK-compressed against a table both ends keep, so they
//! cannot be edited in place: every header block the client sends is decoded with the
//! client's table and encoded again for the server with a table of our own. All other
//! frames, and everything the server sends, pass through untouched, byte for byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use h2::frame::Frame;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 section 3.4), passed through as is.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
/// The largest header block (HEADERS plus CONTINUATIONs) we buffer; far above what any CSI
/// request carries, and a bound on what a client can make us hold.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The largest frame length the frame format can express.
const MAX_FRAME_LEN: usize = (1 << 24) - 1;

/// A server-side connection that rewrites the client's header blocks as described in the
/// module documentation.
pub struct LenientAuthority<S> {
    inner: S,
    /// Bytes read from the client and not yet looked at.
    raw: BytesMut,
    /// Bytes ready for the server.
    out: BytesMut,
    preface_left: usize,
    /// Payload bytes of a frame we pass through that are still to come.
    passthrough: usize,
    /// An open header block: HEADERS and CONTINUATION frames up to END_HEADERS.
    block: Option<BytesMut>,
    /// Decodes the client's header blocks and encodes them for the server; created on the
    /// first header block.
    codec: Option<Box<h2::Codec<MemIo, Bytes>>>,
    eof: bool,
}

impl<S> std::fmt::Debug for LenientAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LenientAuthority")
            .field("buffered", &self.raw.len())
            .field("ready", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl<S> LenientAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            preface_left: PREFACE_LEN,
            passthrough: 0,
            block: None,
            codec: None,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be moved from `raw` to `out`; false when more input is needed.
    fn advance(&mut self) -> io::Result<bool> {
        if self.preface_left > 0 || self.passthrough > 0 {
            let left = if self.preface_left > 0 {
                &mut self.preface_left
            } else {
                &mut self.passthrough
            };
            let n = (*left).min(self.raw.len());
            *left -= n;
            self.out.extend_from_slice(&self.raw.split_to(n));
            return Ok(n > 0);
        }
        if self.raw.len() < FRAME_HEADER_LEN {
            return Ok(false);
        }
        let len = usize::from(self.raw[0]) << 16
            | usize::from(self.raw[1]) << 8
            | usize::from(self.raw[2]);
        let (kind, flags) = (self.raw[3], self.raw[4]);
        let in_block = self.block.is_some();
        if in_block && kind != CONTINUATION {
            return Err(invalid("a header block was interrupted by another frame"));
        }
        if kind != HEADERS && !in_block {
            // Not part of a header block: header as is, payload streamed through.
            self.out
                .extend_from_slice(&self.raw.split_to(FRAME_HEADER_LEN));
            self.passthrough = len;
            return Ok(true);
        }
        let held = self.block.as_ref().map_or(0, BytesMut::len);
        if len > MAX_FRAME_LEN || held + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
            return Err(invalid("header block too large"));
        }
        if self.raw.len() < FRAME_HEADER_LEN + len {
            return Ok(false);
        }
        let frame = self.raw.split_to(FRAME_HEADER_LEN + len);
        let block = self.block.get_or_insert_with(BytesMut::new);
        block.extend_from_slice(&frame);
        if flags & END_HEADERS != 0 {
            let block = self.block.take().unwrap_or_default();
            let reencoded = self.reencode(block)?;
            self.out.extend_from_slice(&reencoded);
        }
        Ok(true)
    }

    /// Decodes one complete header block with the client's HPACK state, drops an authority
    /// h2 would refuse, and encodes the block again with the server-facing state.
    fn reencode(&mut self, block: BytesMut) -> io::Result<BytesMut> {
        let codec = self.codec.get_or_insert_with(|| {
            let mut c = h2::Codec::new(MemIo::default());
            // Accept whatever the server could have accepted; the server judges sizes.
            c.set_max_recv_frame_size(MAX_FRAME_LEN);
            c.set_max_recv_header_list_size(MAX_HEADER_BLOCK);
            Box::new(c)
        });
        codec.get_mut().input.extend_from_slice(&block);
        let mut headers = match codec.next().now_or_never() {
            Some(Some(Ok(Frame::Headers(h)))) => h,
            Some(Some(Ok(other))) => {
                return Err(invalid(format!("expected a header block, got {other:?}")));
            }
            Some(Some(Err(e))) => return Err(invalid(format!("undecodable header block: {e}"))),
            Some(None) | None => return Err(invalid("incomplete header block")),
        };
        let pseudo = headers.pseudo_mut();
        if let Some(authority) = &pseudo.authority
            && http::uri::Authority::try_from(authority.as_ref()).is_err()
        {
            tracing::debug!(authority = ?&**authority, "dropping an :authority h2 would refuse");
            pseudo.authority = None;
        }
        match codec.send(Frame::Headers(headers)).now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(invalid(format!("cannot re-encode headers: {e}"))),
            None => return Err(invalid("re-encoding headers did not complete")),
        }
        let io = codec.get_mut();
        if !io.input.is_empty() {
            return Err(invalid("trailing bytes after a header block"));
        }
        Ok(std::mem::take(&mut io.output))
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<S: AsyncRead + Unpin> AsyncRead for LenientAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.advance()? {
                continue;
            }
            if this.eof {
                if this.raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // A truncated frame at the end: hand it over as it is, the server decides.
                let rest = this.raw.split();
                this.out.extend_from_slice(&rest);
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            } else {
                this.raw.extend_from_slice(read.filled());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LenientAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for LenientAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// In-memory I/O for the HPACK codec: reads what we put in `input` (and never reports end
/// of file, so the codec just waits), collects what it writes in `output`.
#[derive(Debug, Default)]
struct MemIo {
    input: BytesMut,
    output: BytesMut,
}

impl AsyncRead for MemIo {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.input.is_empty() {
            return Poll::Pending;
        }
        let n = this.input.len().min(buf.remaining());
        buf.put_slice(&this.input[..n]);
        this.input.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MemIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Encodes header blocks as a client would, with its own HPACK state.
    struct Client(h2::Codec<MemIo, Bytes>);

    impl Client {
        fn new() -> Self {
            Self(h2::Codec::new(MemIo::default()))
        }

        fn headers(&mut self, id: u32, authority: &str) -> BytesMut {
            let uri: http::Uri = "http://placeholder/csi.v1.Identity/GetPluginInfo"
                .parse()
                .unwrap();
            let mut pseudo = h2::frame::Pseudo::request(http::Method::POST, uri, None);
            // Set through a decoded block: h2 builds authorities only from valid URIs.
            pseudo.authority = None;
            let mut fields = http::HeaderMap::new();
            fields.insert("content-type", "application/grpc".parse().unwrap());
            fields.insert("x-authority-was", authority.parse().unwrap());
            let h = h2::frame::Headers::new(id.into(), pseudo, fields);
            self.0
                .send(Frame::Headers(h))
                .now_or_never()
                .unwrap()
                .unwrap();
            std::mem::take(&mut self.0.get_mut().output)
        }
    }

    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut wrapped = LenientAuthority::new(server);
        let mut out = Vec::new();
        wrapped.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn decode_all(bytes: &[u8]) -> Vec<Frame> {
        let mut c: h2::Codec<MemIo, Bytes> = h2::Codec::new(MemIo::default());
        c.get_mut().input.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Some(Some(f)) = c.next().now_or_never() {
            frames.push(f.unwrap());
        }
        frames
    }

    #[tokio::test]
    async fn preface_and_other_frames_pass_byte_for_byte() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS (empty), then DATA on stream 1 with padding (flags PADDED=0x8).
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        input.extend_from_slice(&[0, 0, 6, 0x0, 0x8, 0, 0, 0, 1, 2, b'h', b'i', 0, 0, 0]);
        assert_eq!(through(input.clone()).await.unwrap(), input);
    }

    #[tokio::test]
    async fn header_blocks_survive_reencoding_with_dynamic_table_references() {
        let mut client = Client::new();
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // The second block refers to table entries the first one added.
        input.extend_from_slice(&client.headers(1, "a"));
        input.extend_from_slice(&client.headers(3, "a"));
        let out = through(input).await.unwrap();
        assert_eq!(&out[..PREFACE_LEN], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let frames = decode_all(&out[PREFACE_LEN..]);
        assert_eq!(frames.len(), 2, "{frames:?}");
        for f in frames {
            let Frame::Headers(h) = f else {
                panic!("{f:?}")
            };
            assert_eq!(h.fields()["content-type"], "application/grpc");
            let (pseudo, _) = h.into_parts();
            assert_eq!(
                pseudo.path.as_deref(),
                Some("/csi.v1.Identity/GetPluginInfo")
            );
        }
    }

    #[tokio::test]
    async fn garbage_in_a_header_block_closes_the_connection() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // HEADERS, END_HEADERS, stream 1, payload: an HPACK index that does not exist.
        input.extend_from_slice(&[0, 0, 1, HEADERS, END_HEADERS, 0, 0, 0, 1, 0xff]);
        let err = through(input).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
