//! A TCP proxy in front of a broker's advertised listener that can hold back the broker's
//! answers to one kind of request (e.g. offset commits, Kafka API key 8), and only those:
//! every other answer on the same connection (heartbeats, the group's join and sync,
//! fetches) passes. librdkafka matches answers to requests by correlation id, so one answer
//! held while later ones pass is taken as a slow request, as from a group coordinator that
//! takes long to write the offsets topic.
//!
//! Start it before the broker, on the broker's port-to-be (the broker advertises the proxy's
//! port: every connection after the bootstrap goes through it).

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Kafka's Produce request.
pub const PRODUCE: i16 = 0;
/// Kafka's OffsetCommit request.
pub const OFFSET_COMMIT: i16 = 8;
/// Kafka's SyncGroup request (the end of a classic group's join).
pub const SYNC_GROUP: i16 = 14;
/// KIP-848's ConsumerGroupHeartbeat request (a member joins, and learns its assignment, by it).
pub const CONSUMER_GROUP_HEARTBEAT: i16 = 68;

struct Shared {
    upstream: u16,
    /// The API key whose answers are held back (-1: none).
    hold: AtomicI32,
    /// Only this client's requests are held (`None`: every client's), once as many as the
    /// count have passed.
    only: Mutex<Option<(String, usize)>>,
    /// Requests of that key sent while holding, per client id.
    held: Mutex<HashMap<String, usize>>,
}

impl Shared {
    fn holding(&self) -> bool {
        self.hold.load(Ordering::SeqCst) >= 0
    }
}

pub struct KafkaProxy {
    /// The port clients are sent to (advertise it as the broker's PLAINTEXT listener).
    pub port: u16,
    shared: Arc<Shared>,
}

impl KafkaProxy {
    /// A proxy to the broker that is to listen on `upstream` (loopback).
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream,
            hold: AtomicI32::new(-1),
            only: Mutex::default(),
            held: Mutex::default(),
        });
        let accepting = Arc::clone(&shared);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let shared = Arc::clone(&accepting);
                std::thread::spawn(move || serve(client, &shared));
            }
        });
        Self { port, shared }
    }

    /// A broker of its own behind a proxy: the broker advertises the proxy's port, so every
    /// connection after the bootstrap goes through it.
    pub fn with_broker() -> (Self, super::Broker) {
        Self::with_broker_props("")
    }

    /// [`Self::with_broker`] with extra server properties.
    pub fn with_broker_props(props: &str) -> (Self, super::Broker) {
        let port = super::free_port();
        let proxy = Self::start(port);
        let broker = super::Broker::start_on_port(
            port,
            &format!(
                "advertised.listeners=PLAINTEXT://127.0.0.1:{},CONTROLLER://127.0.0.1:{{controller_port}}\n{props}",
                proxy.port
            ),
            &[],
        );
        (proxy, broker)
    }

    /// Waits (at most 60 s) until an answer to the client `client_id` is held back;
    /// `log` tells what it did instead.
    pub fn wait_held(&self, client_id: &str, log: impl Fn() -> String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.requests_held(client_id) < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "no request of {client_id} held back:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// From now on, answers to offset commits are held back until [`Self::release`].
    pub fn hold_commits(&self) {
        self.hold(OFFSET_COMMIT);
    }

    /// From now on, answers to requests with `api_key` are held back until [`Self::release`].
    pub fn hold(&self, api_key: i16) {
        *self.shared.only.lock().unwrap() = None;
        self.shared.hold.store(i32::from(api_key), Ordering::SeqCst);
    }

    /// From now on, answers to the client `client_id`'s requests with `api_key` are held back
    /// until [`Self::release`], once its next `pass` such requests have been answered as
    /// usual. Other clients' answers pass.
    pub fn hold_client(&self, api_key: i16, client_id: &str, pass: usize) {
        *self.shared.only.lock().unwrap() = Some((client_id.to_owned(), pass));
        self.shared.hold.store(i32::from(api_key), Ordering::SeqCst);
    }

    /// Delivers the held answers, and lets later ones through.
    pub fn release(&self) {
        self.shared.hold.store(-1, Ordering::SeqCst);
    }

    /// Requests of the held kind the client `client_id` sent while holding (their answers
    /// held back, or delivered since).
    pub fn requests_held(&self, client_id: &str) -> usize {
        let held = self.shared.held.lock().unwrap();
        held.get(client_id).copied().unwrap_or(0)
    }
}

fn serve(client: TcpStream, shared: &Arc<Shared>) {
    let Ok(broker) = TcpStream::connect(("127.0.0.1", shared.upstream)) else {
        return;
    };
    let held_ids: Arc<Mutex<HashSet<i32>>> = Arc::default();
    let _ = (client.set_nodelay(true), broker.set_nodelay(true));
    let (requests_in, requests_out) = (client.try_clone().unwrap(), broker.try_clone().unwrap());
    let ids = Arc::clone(&held_ids);
    let counting = Arc::clone(shared);
    std::thread::spawn(move || forward_requests(requests_in, requests_out, &ids, &counting));
    forward_answers(broker, client, &held_ids, shared);
}

/// Client to broker: every request as it comes; notes the correlation ids of requests of the
/// held kind sent while holding.
fn forward_requests(
    mut from: TcpStream,
    mut to: TcpStream,
    held_ids: &Mutex<HashSet<i32>>,
    shared: &Shared,
) {
    while let Some(frame) = read_frame(&mut from) {
        // Request header (v1 and v2): size, api key (i16), api version (i16), correlation id
        // (i32), client id (i16 length, then the bytes; -1: none).
        if frame.len() >= 14 && shared.holding() {
            let api_key = i16::from_be_bytes([frame[4], frame[5]]);
            if i32::from(api_key) == shared.hold.load(Ordering::SeqCst) {
                let id = i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
                let len = usize::try_from(i16::from_be_bytes([frame[12], frame[13]])).unwrap_or(0);
                let client = frame
                    .get(14..14 + len)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let held = match &mut *shared.only.lock().unwrap() {
                    None => true,
                    Some((only, _)) if *only != client => false,
                    Some((_, pass)) if *pass > 0 => {
                        *pass -= 1;
                        false
                    }
                    Some(_) => true,
                };
                if held {
                    held_ids.lock().unwrap().insert(id);
                    *shared.held.lock().unwrap().entry(client).or_default() += 1;
                }
            }
        }
        if to.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Broker to client: every answer as it comes, except those to held requests while holding;
/// those go out once released.
fn forward_answers(
    mut from: TcpStream,
    mut to: TcpStream,
    held_ids: &Mutex<HashSet<i32>>,
    shared: &Shared,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf: Vec<u8> = Vec::new();
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if !shared.holding() {
            for frame in held.drain(..) {
                if to.write_all(&frame).is_err() {
                    return;
                }
            }
        }
        match from.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        // Answer header: size (i32), correlation id (i32).
        while buf.len() >= 8 {
            let size = usize::try_from(i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))
                .expect("a Kafka answer's size");
            if buf.len() < 4 + size {
                break;
            }
            let frame: Vec<u8> = buf.drain(..4 + size).collect();
            let id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let hold = held_ids.lock().unwrap().remove(&id) && shared.holding();
            if hold {
                held.push(frame);
            } else if to.write_all(&frame).is_err() {
                return;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// One size-prefixed Kafka frame, size included (`None` at the end of the stream).
fn read_frame(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    from.read_exact(&mut size).ok()?;
    let n = usize::try_from(i32::from_be_bytes(size)).ok()?;
    let mut frame = vec![0u8; 4 + n];
    frame[..4].copy_from_slice(&size);
    from.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}
