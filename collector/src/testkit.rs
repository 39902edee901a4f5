//! A minimal protocol client built from `tally-protocol`, for tests and benchmarks: connects
//! over QUIC, runs the client handshake, sends frames and reads what comes back. It is not the
//! agent (no disk buffer, no retries): it sends exactly what it is told to, which is what tests
//! of the collector's rules need (tampered batches, replays, duplicates).

use std::net::SocketAddr;
use tally_net::frames::{FrameReader, write_frame};
use tally_net::tls::{binding, client_config};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::frame::{Frame, Welcome};
use tally_protocol::handshake::ClientHandshake;

/// Why the test client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connection, stream or TLS failure.
    #[error("transport: {0}")]
    Transport(String),
    /// The collector answered with an error frame.
    #[error("refused: {0:?}")]
    Refused(tally_protocol::frame::ErrorFrame),
    /// Something else than the expected frame came.
    #[error("unexpected frame: {0:?}")]
    Unexpected(Box<Frame>),
    /// The handshake failed locally.
    #[error("handshake: {0}")]
    Handshake(#[from] tally_protocol::handshake::HandshakeError),
}

fn t<E: std::fmt::Display>(e: E) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// A connected, authenticated test client.
pub struct TestClient {
    /// The endpoint (kept alive with the connection).
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// The stream's send half.
    pub send: quinn::SendStream,
    /// The stream's receive half, framed.
    pub recv: FrameReader,
    /// What the collector said on welcome.
    pub welcome: Welcome,
}

/// An open stream before the handshake (for tests that misbehave during it).
pub struct RawStream {
    /// The endpoint.
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// Send half.
    pub send: quinn::SendStream,
    /// Receive half, framed.
    pub recv: FrameReader,
    /// This connection's handshake binding.
    pub binding: [u8; 32],
}

impl RawStream {
    /// Connects and opens the one stream.
    pub async fn open(addr: SocketAddr, ca_pem: &[u8]) -> Result<Self, ClientError> {
        let mut endpoint =
            quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(t)?;
        endpoint.set_default_client_config(client_config(ca_pem).map_err(t)?);
        let conn = endpoint
            .connect(addr, "localhost")
            .map_err(t)?
            .await
            .map_err(t)?;
        let (send, recv) = conn.open_bi().await.map_err(t)?;
        let binding = binding(&conn)
            .ok_or_else(|| ClientError::Transport(String::from("no keying material")))?;
        Ok(RawStream {
            endpoint,
            conn,
            send,
            recv: FrameReader::new(recv),
            binding,
        })
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        write_frame(&mut self.send, frame).await.map_err(t)
    }

    /// Reads the next frame.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        read(&mut self.recv).await
    }
}

async fn read(recv: &mut FrameReader) -> Result<Frame, ClientError> {
    recv.next().await.map_err(t)
}

impl TestClient {
    /// Connects, handshakes with `key` (and `enroll_token`), and returns once welcomed.
    pub async fn connect(
        addr: SocketAddr,
        ca_pem: &[u8],
        key: &SigningKey,
        enroll_token: Option<&str>,
    ) -> Result<Self, ClientError> {
        let mut raw = RawStream::open(addr, ca_pem).await?;
        let (mut hs, hello) =
            ClientHandshake::start(key.clone(), raw.binding.to_vec(), enroll_token)?;
        raw.send(&Frame::Hello(hello)).await?;
        let challenge = match raw.recv().await? {
            Frame::Challenge(c) => c,
            Frame::Error(e) => return Err(ClientError::Refused(e)),
            other => return Err(ClientError::Unexpected(Box::new(other))),
        };
        let proof = hs.on_challenge(&challenge)?;
        raw.send(&Frame::Proof(proof)).await?;
        let welcome = match raw.recv().await? {
            Frame::Welcome(w) => w,
            Frame::Error(e) => return Err(ClientError::Refused(e)),
            other => return Err(ClientError::Unexpected(Box::new(other))),
        };
        hs.on_welcome(&welcome)?;
        Ok(TestClient {
            endpoint: raw.endpoint,
            conn: raw.conn,
            send: raw.send,
            recv: raw.recv,
            welcome,
        })
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        write_frame(&mut self.send, frame).await.map_err(t)
    }

    /// Reads the next frame.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        read(&mut self.recv).await
    }

    /// Closes the connection the way an agent that stops does, and waits until the collector
    /// was told.
    pub async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
        self.endpoint.wait_idle().await;
    }

    /// Reads frames until an ack or error arrives, skipping pushes (catalog, entitlements).
    pub async fn next_reply(&mut self) -> Result<Frame, ClientError> {
        loop {
            match self.recv().await? {
                Frame::Catalog(_) | Frame::Entitlements(_) => continue,
                f => return Ok(f),
            }
        }
    }
}
