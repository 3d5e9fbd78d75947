//! The control plane's protocol: a proxy dials the operator's config service, receives its
//! listeners, acknowledges them and reports its stats (see `proto/l4proxy/control/v1`).

pub mod proto;

/// The largest message either side accepts (a config of 64 listeners of 1024 backends each is
/// about 5 MiB of JSON).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The audience a proxy's ServiceAccount token must carry.
pub const TOKEN_AUDIENCE: &str = "l4proxy.dev";
