//! Choosing a route for what probing found: every field a route gives must match, and the most
//! specific matching route wins (exact server name over wildcard, longer wildcard over shorter,
//! then a matched ALPN, then a matched protocol); ties go to the route listed first. No match:
//! the listener's own backends (the default route).

use crate::{
    config::{RouteConfig, RouteProtocol},
    probe::{ProbeInfo, TcpProbedProtocol, UdpProbedProtocol},
};

/// What probing found about a connection or session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probed<'a> {
    pub protocol: Option<RouteProtocol>,
    pub server_name: Option<&'a str>,
    pub alpn: &'a [String],
}

impl<'a> Probed<'a> {
    /// What a probe detected.
    pub fn found(protocol: RouteProtocol, info: &'a ProbeInfo) -> Self {
        Self { protocol: Some(protocol), server_name: info.server_name.as_deref(), alpn: &info.alpn }
    }
}

impl From<TcpProbedProtocol> for RouteProtocol {
    fn from(protocol: TcpProbedProtocol) -> Self {
        match protocol {
            TcpProbedProtocol::Tls => Self::Tls,
            TcpProbedProtocol::Http => Self::Http,
            TcpProbedProtocol::Ssh => Self::Ssh,
        }
    }
}

impl From<UdpProbedProtocol> for RouteProtocol {
    fn from(protocol: UdpProbedProtocol) -> Self {
        match protocol {
            UdpProbedProtocol::Quic => Self::Quic,
            UdpProbedProtocol::WireGuard => Self::WireGuard,
        }
    }
}

type Specificity = ((u8, usize), bool, bool);

fn specificity(route: &RouteConfig, probed: &Probed<'_>) -> Option<Specificity> {
    if route.protocol.is_some() && route.protocol != probed.protocol {
        return None;
    }
    let name = if route.server_names.is_empty() {
        (0, 0)
    } else {
        let name = probed.server_name?;
        route.server_names.iter().filter_map(|n| n.specificity(name)).max()?
    };
    if !route.alpn.is_empty() && !route.alpn.iter().any(|a| probed.alpn.contains(a)) {
        return None;
    }
    Some((name, !route.alpn.is_empty(), route.protocol.is_some()))
}

/// Index of the best matching route, or `None` for the default route.
pub fn best_route(routes: &[RouteConfig], probed: &Probed<'_>) -> Option<usize> {
    let mut best: Option<(usize, Specificity)> = None;
    for (i, route) in routes.iter().enumerate() {
        if let Some(score) = specificity(route, probed)
            && best.is_none_or(|(_, b)| score > b)
        {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerName;

    fn route(protocol: Option<RouteProtocol>, names: &[&str], alpn: &[&str]) -> RouteConfig {
        RouteConfig {
            protocol,
            server_names: names
                .iter()
                .map(|n| match n.strip_prefix('*') {
                    Some(suffix) => ServerName::Suffix(suffix.to_owned()),
                    None => ServerName::Exact((*n).to_owned()),
                })
                .collect(),
            alpn: alpn.iter().map(|a| (*a).to_owned()).collect(),
            backends: Vec::new(),
        }
    }

    fn tls<'a>(name: Option<&'a str>, alpn: &'a [String]) -> Probed<'a> {
        Probed { protocol: Some(RouteProtocol::Tls), server_name: name, alpn }
    }

    #[test]
    fn exact_server_name_beats_wildcard_and_wildcard_beats_protocol_only() {
        let routes = vec![
            route(Some(RouteProtocol::Tls), &[], &[]),
            route(Some(RouteProtocol::Tls), &["*.example.com"], &[]),
            route(Some(RouteProtocol::Tls), &["api.example.com"], &[]),
        ];
        assert_eq!(best_route(&routes, &tls(Some("api.example.com"), &[])), Some(2));
        assert_eq!(best_route(&routes, &tls(Some("www.example.com"), &[])), Some(1));
        assert_eq!(best_route(&routes, &tls(Some("other.org"), &[])), Some(0));
        assert_eq!(best_route(&routes, &tls(None, &[])), Some(0));
    }

    #[test]
    fn longer_wildcard_is_more_specific() {
        let routes = vec![route(None, &["*.example.com"], &[]), route(None, &["*.eu.example.com"], &[])];
        assert_eq!(best_route(&routes, &tls(Some("a.eu.example.com"), &[])), Some(1));
        assert_eq!(best_route(&routes, &tls(Some("a.us.example.com"), &[])), Some(0));
    }

    #[test]
    fn alpn_must_be_offered_and_adds_specificity() {
        let offered = vec!["h2".to_owned(), "http/1.1".to_owned()];
        let routes = vec![route(Some(RouteProtocol::Tls), &[], &[]), route(Some(RouteProtocol::Tls), &[], &["h2"])];
        assert_eq!(best_route(&routes, &tls(None, &offered)), Some(1));
        assert_eq!(best_route(&routes, &tls(None, &[])), Some(0));
    }

    #[test]
    fn unmatched_traffic_uses_the_default_route() {
        let routes = vec![route(Some(RouteProtocol::Ssh), &[], &[])];
        assert_eq!(best_route(&routes, &Probed::default()), None);
        assert_eq!(best_route(&routes, &tls(Some("a.example.com"), &[])), None);
    }

    #[test]
    fn ties_go_to_the_route_listed_first() {
        let routes = vec![route(Some(RouteProtocol::Http), &[], &[]), route(Some(RouteProtocol::Http), &[], &[])];
        let http = Probed { protocol: Some(RouteProtocol::Http), ..Default::default() };
        assert_eq!(best_route(&routes, &http), Some(0));
    }
}
