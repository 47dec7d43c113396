//! Ports for the servers the tests start.
//!
//! Binding port 0, closing the socket and handing the number to a server races every other process on the
//! machine: until the server binds it, the kernel may give the same number to anyone's next `bind(0)` or
//! outgoing connection, and two tests running at once then meet on one port. Redis, PostgreSQL and Kafka's
//! controller cannot bind port 0 and report what they got, so they need a number chosen beforehand.
//!
//! A [`Port`] is taken from a range just below the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), which neither `bind(0)` nor outgoing connections use, and is
//! reserved among test processes by an exclusive lock on a file named after it in `$TMPDIR/umw-ports`. The
//! lock is held for as long as the value lives, so a server keeps its port across restarts and no other
//! test is given it meanwhile. The shell scripts that start servers (`e2e/testenv/ports.sh`) take the same
//! locks, so Rust tests and scripts running at once do not collide either.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;

/// How many ports the reserved range holds (below the ephemeral range's first port).
const RANGE_SIZE: u16 = 10_000;

/// A port reserved for one test server until dropped.
#[derive(Debug)]
pub struct Port {
    number: u16,
    _lock: File,
}

impl Port {
    pub fn get(&self) -> u16 {
        self.number
    }
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.number.fmt(f)
    }
}

/// A port for a server on loopback.
pub fn reserve() -> Port {
    reserve_on("127.0.0.1")
}

/// A port for a server listening on `host` (an address of this machine): one no other test holds and
/// that nothing listens on now.
pub fn reserve_on(host: &str) -> Port {
    reserve_in(host, range(ephemeral_range()))
}

fn reserve_in(host: &str, range: std::ops::Range<u16>) -> Port {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let size = range.end - range.start;
    let first = fastrand::u16(..size);
    for i in 0..size {
        let number = range.start + (first + i) % size;
        let path = dir.join(number.to_string());
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => panic!("cannot lock {}: {e}", path.display()),
        }
        // Held by no test; something else on the machine may still listen there.
        if std::net::TcpListener::bind((host, number)).is_ok() {
            return Port { number, _lock: file };
        }
    }
    panic!("no free port on {host} in {range:?}: every one is held by a test or in use")
}

/// Where the locks live: shared by every test process and script of this user.
fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("umw-ports")
}

/// The kernel's ephemeral range, `(first, last)`; Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut numbers = text.split_whitespace().map(str::parse::<u16>);
            Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

/// The ports to choose from: below the ephemeral range, or above it when it starts too low.
fn range((first, last): (u16, u16)) -> std::ops::Range<u16> {
    if first >= 1024 + RANGE_SIZE {
        first - RANGE_SIZE..first
    } else if last <= u16::MAX - RANGE_SIZE {
        last + 1..last + 1 + RANGE_SIZE
    } else {
        panic!("the ephemeral port range {first}-{last} leaves no room for test servers' ports")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_lies_outside_the_ephemeral_one() {
        assert_eq!(range((32768, 60999)), 22768..32768);
        assert_eq!(range((2000, 30000)), 30001..40001);
    }

    #[test]
    fn a_reserved_port_is_not_given_twice_until_it_is_dropped() {
        let ports: Vec<Port> = (0..50).map(|_| reserve()).collect();
        let mut numbers: Vec<u16> = ports.iter().map(Port::get).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), 50, "a port was reserved twice");
        let (low, _) = ephemeral_range();
        assert!(numbers.iter().all(|&n| n < low), "{numbers:?} reach into the ephemeral range");

        // Another process (as a script's flock would) cannot take a held one.
        let held = &ports[0];
        let path = lock_dir().join(held.get().to_string());
        let out = std::process::Command::new("flock")
            .args(["-n", &path.to_string_lossy(), "true"])
            .status()
            .expect("flock (util-linux)");
        assert!(!out.success(), "flock took port {held}'s lock while it is reserved");
        let number = held.get();
        drop(ports);
        let out = std::process::Command::new("flock")
            .args(["-n", &lock_dir().join(number.to_string()).to_string_lossy(), "true"])
            .status()
            .expect("flock (util-linux)");
        assert!(out.success(), "port {number}'s lock is still held after it was dropped");
    }

    #[test]
    fn a_port_something_listens_on_is_skipped() {
        let number = reserve().get();
        // Free and unlocked again: it is reserved when asked for alone.
        let port = reserve_in("127.0.0.1", number..number + 1);
        assert_eq!(port.get(), number);
        drop(port);
        let _listener = std::net::TcpListener::bind(("127.0.0.1", number)).expect("listening on the port");
        let taken = std::panic::catch_unwind(|| reserve_in("127.0.0.1", number..number + 1));
        assert!(taken.is_err(), "port {number} was reserved while something listens on it");
    }
}
