//! PROXY protocol v1 (text) and v2 (binary): parse a header from a trusted peer, and write one
//! towards a backend. See the HAProxy PROXY protocol specification.
