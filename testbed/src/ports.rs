//! Free loopback ports: bound and released, so the process started next can bind them.

use std::net::{TcpListener, UdpSocket};

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("a free UDP port on loopback")
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("a free TCP port on loopback")
}
