//! A lean gRPC unary client straight on `h2`: each request frame is encoded once, up
//! front, and sent as is. It stands in for a load generator such as `h2load` or `ghz`,
//! so the figure is the server's rather than a client stack's: tonic's own client (a
//! tower buffer task, codecs, header maps per call) costs about as much CPU per call as
//! the server does, on the same two cores.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpStream;

/// One HTTP/2 connection, one call in flight at a time.
pub struct LeanClient {
    send: h2::client::SendRequest<Bytes>,
    authority: String,
}

impl LeanClient {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(connection);
        Ok(Self {
            send,
            authority: addr.to_string(),
        })
    }

    /// A message as a gRPC frame: uncompressed flag, big-endian length, bytes.
    pub fn frame(message: &impl prost::Message) -> anyhow::Result<Bytes> {
        let len = message.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len)?);
        message.encode(&mut buf)?;
        Ok(buf.freeze())
    }

    /// Calls `path` with the framed request; fails unless the call returns grpc-status
    /// 0, and returns the response frame's bytes.
    pub async fn call(&mut self, path: &str, token: &str, frame: Bytes) -> anyhow::Result<Bytes> {
        let request = http::Request::post(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", token)
            .body(())?;
        self.send = self.send.clone().ready().await?;
        let (response, mut stream) = self.send.send_request(request, false)?;
        stream.send_data(frame, true)?;
        let mut body = response.await?.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        let status = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing");
        anyhow::ensure!(status == "0", "grpc-status {status}");
        Ok(data.freeze())
    }
}
