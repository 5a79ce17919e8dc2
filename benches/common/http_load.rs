//! An open-loop HTTP/1.1 load generator that costs little CPU, for the API bench: on a 2-core
//! machine shared with the broker, Redis and tierd, a generator that takes a core of its own
//! (reqwest with a tokio worker took about one at 10,000 lookups/s) measures its own queueing
//! instead of tierd's answers.
//!
//! One thread, plain keep-alive `TcpStream`s and `epoll`: each request is written at its
//! scheduled moment on an idle connection (a new one is opened when none is idle, up to 256;
//! beyond that a request waits for one), and the thread sleeps in `epoll_pwait2`, whose timeout has nanosecond resolution, until either an
//! answer arrives or the next request is due (tokio's timer, like `epoll_wait`'s, rounds to
//! whole milliseconds: pacing with it sends a millisecond's requests at once and late). A
//! request's latency runs from its **scheduled** moment to the moment its whole answer has
//! been read, so a stalled server is not hidden by a generator that waits for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// What a run measured.
pub struct LoadReport {
    /// Per request: latency from its scheduled moment, and the HTTP status (0: no answer —
    /// the connection failed or the run's deadline passed first; its latency is then the time
    /// until it was given up, a lower bound).
    pub results: Vec<(Duration, u16)>,
    /// The most a request was sent after its scheduled moment (the generator's own lag).
    pub behind: Duration,
    /// Connections opened.
    pub connections: usize,
}

/// Connections kept open at most (a stalled server would otherwise get one per request).
const MAX_CONNECTIONS: usize = 256;

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The request in flight on it: when it was due, and its index.
    in_flight: Option<(Instant, usize)>,
}

/// Sends `total` GET requests to `addr` at `rate` per second, the `i`-th for `path(i)`,
/// and waits for their answers (at most `patience` after the last one is due).
///
/// # Panics
/// If epoll cannot be used, a connection cannot be opened, or an answer is not HTTP/1.1
/// with a `Content-Length` (what tierd's API sends).
pub fn open_loop(
    addr: SocketAddr,
    rate: u64,
    total: usize,
    patience: Duration,
    mut path: impl FnMut(usize) -> String,
) -> LoadReport {
    // SAFETY: plain syscalls on descriptors this function owns; `events` outlives each call.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        epoll >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now() + Duration::from_millis(50);
    let due = |i: usize| start + interval.mul_f64(i as f64);
    let last_due = due(total.saturating_sub(1));
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut idle: Vec<usize> = Vec::new();
    let mut results = vec![(Duration::ZERO, 0u16); total];
    let mut done = 0usize;
    let mut next = 0usize;
    let mut waiting = std::collections::VecDeque::new();
    let mut open = 0usize;
    let mut behind = Duration::ZERO;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut chunk = vec![0u8; 64 * 1024];
    while done < total {
        let now = Instant::now();
        while next < total && due(next) <= now {
            behind = behind.max(now - due(next));
            waiting.push_back(next);
            next += 1;
        }
        // Due requests go out on idle connections, new ones up to `MAX_CONNECTIONS`; beyond
        // that they wait for a connection (their latency still runs from their schedule).
        while let Some(&i) = waiting.front() {
            let c = match idle.pop() {
                // Closed by the server while idle: gone.
                Some(c) if conns[c].is_none() => continue,
                Some(c) => c,
                None if open < MAX_CONNECTIONS => {
                    // Bounded, so that a server that stops accepting cannot hold the loop.
                    let left = (last_due + patience).saturating_duration_since(now);
                    let timeout = left.clamp(Duration::from_millis(1), Duration::from_secs(5));
                    let Ok(stream) = TcpStream::connect_timeout(&addr, timeout) else {
                        waiting.pop_front();
                        results[i] = (Instant::now() - due(i), 0);
                        done += 1;
                        continue;
                    };
                    stream.set_nodelay(true).expect("TCP_NODELAY");
                    let mut ev = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: conns.len() as u64,
                    };
                    // SAFETY: see above.
                    let rc = unsafe {
                        libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut ev)
                    };
                    assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
                    conns.push(Some(Conn {
                        stream,
                        buf: Vec::with_capacity(4096),
                        in_flight: None,
                    }));
                    open += 1;
                    conns.len() - 1
                }
                None => break,
            };
            waiting.pop_front();
            let conn = conns[c].as_mut().expect("an idle connection is open");
            let request = format!("GET {} HTTP/1.1\r\nHost: {addr}\r\n\r\n", path(i));
            // A blocking socket: a request this small goes out at once.
            if conn.stream.write_all(request.as_bytes()).is_err() {
                results[i] = (Instant::now() - due(i), 0);
                done += 1;
                conns[c] = None;
                open -= 1;
            } else {
                conn.in_flight = Some((due(i), i));
            }
        }
        if now > last_due + patience {
            // What is still in flight or waiting gets no answer, and at least this latency
            // (so that lost requests raise the percentiles instead of counting as instant).
            let unanswered = conns
                .iter()
                .flatten()
                .filter_map(|c| c.in_flight.map(|(_, i)| i))
                .chain(waiting.iter().copied());
            for i in unanswered {
                results[i] = (now - due(i), 0);
            }
            break;
        }
        let wait = if next < total {
            due(next).saturating_duration_since(Instant::now())
        } else {
            (last_due + patience).saturating_duration_since(Instant::now())
        };
        let timeout = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
        };
        // SAFETY: see above. epoll_pwait2 (Linux 5.11): a timeout in nanoseconds.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                epoll,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &timeout as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::Interrupted,
                "epoll_pwait2: {e}"
            );
            continue;
        }
        let arrived = Instant::now();
        for ev in &events[..n as usize] {
            let c = ev.u64 as usize;
            let Some(conn) = conns[c].as_mut() else {
                continue;
            };
            // Level-triggered and readable: this read does not block.
            let read = conn.stream.read(&mut chunk);
            let Ok(len) = read
                .map_err(drop)
                .and_then(|n| if n == 0 { Err(()) } else { Ok(n) })
            else {
                if let Some((due, i)) = conn.in_flight.take() {
                    results[i] = (arrived - due, 0);
                    done += 1;
                }
                // Closing the socket removes it from the epoll set.
                conns[c] = None;
                open -= 1;
                continue;
            };
            conn.buf.extend_from_slice(&chunk[..len]);
            if let Some((status, answer_len)) = parse_answer(&conn.buf) {
                conn.buf.drain(..answer_len);
                let (due, i) = conn
                    .in_flight
                    .take()
                    .expect("an answer arrives only for a request in flight");
                results[i] = (arrived - due, status);
                done += 1;
                idle.push(c);
            }
        }
    }
    // SAFETY: see above.
    unsafe { libc::close(epoll) };
    LoadReport {
        results,
        behind,
        connections: conns.len(),
    }
}

/// `(status, length)` of the whole answer at the start of `buf`, once it is all there.
fn parse_answer(buf: &[u8]) -> Option<(u16, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).expect("an HTTP head is text");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 answer: {head:?}"));
    let body: usize = lines
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("an answer without Content-Length: {head:?}"));
    (buf.len() >= head_end + body).then_some((status, head_end + body))
}
