// use tokio::io::{AsyncRead, AsyncWrite};

mod broker;
// aerekos patch: pub(crate) for `tls::crypto_provider` (the bridge uses it).
#[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
pub(crate) mod tls;

pub use broker::{Broker, Disconnector, LinkType, Server};

// pub trait IO: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
// impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> IO for T {}
