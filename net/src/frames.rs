//! Length-prefixed frames on a quinn stream: a cancel-safe reader over the protocol's
//! [`FrameDecoder`] and a writer. Limits are the decoder's: a frame over the reader's limit is
//! refused at its prefix, before its payload is buffered.

use quinn::{RecvStream, SendStream};
use tally_protocol::frame::{Frame, FrameDecoder, FrameError, encode_frame};

/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 64 * 1024;

/// Why reading a frame stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer finished the stream cleanly between frames.
    #[error("stream finished by the peer")]
    Finished,
    /// The peer finished the stream in the middle of a frame.
    #[error("stream finished in the middle of a frame")]
    Truncated,
    /// The stream or the connection failed.
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
    /// The bytes are not a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The frame cannot be encoded (over the size limit).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream or the connection failed.
    #[error("stream: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Reads whole frames from a stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    chunk: Box<[u8]>,
}

impl FrameReader {
    /// A reader with the protocol's frame limit.
    pub fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// Frames over `limit` bytes are refused from now on (e.g. before a peer authenticated).
    pub fn set_limit(&mut self, limit: usize) {
        self.decoder.set_limit(limit);
    }

    /// The next frame. Cancel-safe: bytes read before a cancellation stay buffered, so this can
    /// be one branch of a `select!`.
    pub async fn next(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(f);
            }
            match self.recv.read(&mut self.chunk).await? {
                Some(n) => self.decoder.push(&self.chunk[..n]),
                None if self.decoder.buffered() == 0 => return Err(ReadError::Finished),
                None => return Err(ReadError::Truncated),
            }
        }
    }
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), WriteError> {
    send.write_all(&encode_frame(frame)?).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{client_config, server_config};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tally_protocol::frame::{Challenge, encode_frame};

    /// A CA and a `localhost` certificate it signed: (ca pem, cert pem, key pem).
    fn pki() -> (String, String, String) {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_pem, cert.pem(), key.serialize_pem())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_cross_a_real_connection_whole_split_and_refused_over_the_limit() {
        let (ca, cert, key) = pki();
        let server = quinn::Endpoint::server(
            server_config(cert.as_bytes(), key.as_bytes()).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let f = Frame::Challenge(Challenge { nonce: [9; 32] });
        let bytes = encode_frame(&f).unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_send, recv) = conn.accept_bi().await.unwrap();
            let mut r = FrameReader::new(recv);
            let first = r.next().await.unwrap();
            let second = r.next().await.unwrap();
            r.set_limit(8);
            let third = r.next().await;
            (first, second, third.map_err(|e| e.to_string()), conn)
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(ca.as_bytes()).unwrap());
        let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
        assert_eq!(
            crate::tls::binding(&conn).map(|b| b.len()),
            Some(32),
            "the exporter gives a binding"
        );
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &f).await.unwrap();
        // The second frame in two pieces.
        send.write_all(&bytes[..3]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        send.write_all(&bytes[3..]).await.unwrap();
        // The third is over the reader's new limit.
        write_frame(&mut send, &f).await.unwrap();
        let (first, second, third, _conn) = accept.await.unwrap();
        assert_eq!(first, f);
        assert_eq!(second, f);
        assert!(third.unwrap_err().contains("over the limit"));
    }
}
