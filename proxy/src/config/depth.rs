//! A linear pre-scan of YAML text for how deeply its collections nest, so that a hostile file
//! (100,000 nested `[`) is refused before the parser, whose time grows with the square of the
//! depth, sees it.
//!
//! The scan over-counts rather than under-counts: block nesting is counted by indentation and
//! by `- ` entries that open a sequence on the same line, flow nesting by brackets outside
//! quoted scalars and comments. A plain scalar containing a bracket (rare in a config, where an
//! IPv6 address must be quoted anyway) may count as one level more than it is.

/// The first line (1-based) at which collections nest deeper than `max`, if any.
pub fn first_too_deep(text: &str, max: usize) -> Option<usize> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    for (number, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut at = 0;
        if flow == 0 && quote.is_none() {
            let indent = bytes.iter().take_while(|&&b| b == b' ').count();
            let rest = &bytes[indent..];
            if rest.is_empty() || rest[0] == b'#' {
                continue;
            }
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            // `- - x`: each further `- ` opens a sequence inside the entry.
            at = indent;
            while bytes.get(at) == Some(&b'-') && matches!(bytes.get(at + 1), Some(b' ') | None) {
                at += 2;
                indents.push(at);
            }
        }
        let block = indents.len();
        while at < bytes.len() {
            let b = bytes[at];
            match quote {
                Some(q) => {
                    if b == b'\\' && q == b'"' {
                        at += 1;
                    } else if b == q {
                        quote = None;
                    }
                }
                None => match b {
                    b'"' | b'\'' => quote = Some(b),
                    b'#' if at == 0 || bytes[at - 1] == b' ' => break,
                    b'[' | b'{' => {
                        flow += 1;
                        if block + flow > max {
                            return Some(number + 1);
                        }
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            at += 1;
        }
        if block > max {
            return Some(number + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quickstart_and_a_full_config_are_shallow() {
        let quickstart = include_str!("../../../examples/quickstart.yaml");
        assert_eq!(first_too_deep(quickstart, 8), None);
        let routed = "listeners:\n- name: web\n  routes:\n  - match: {protocol: TLS, serverNames: ['*.a.b', \"x]\"]}\n    backends:\n    - address: '[::1]:1' # a [ comment\n";
        assert_eq!(first_too_deep(routed, 8), None);
    }

    #[test]
    fn deep_flow_nesting_is_found_at_its_line() {
        let text = format!("a: 1\nb: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(first_too_deep(&text, 32), Some(2));
        let maps = format!("x: {}1{}\n", "{a: ".repeat(40), "}".repeat(40));
        assert_eq!(first_too_deep(&maps, 32), Some(1));
    }

    #[test]
    fn deep_block_nesting_is_found() {
        let indented: String = (0..40).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert_eq!(first_too_deep(&indented, 32), Some(33));
        let dashes = format!("{}x\n", "- ".repeat(40));
        assert_eq!(first_too_deep(&dashes, 32), Some(1));
    }

    #[test]
    fn brackets_in_quotes_and_comments_do_not_count() {
        let text = format!("a: '{}'\nb: \"{}\" # {}\n", "[".repeat(50), "{".repeat(50), "[".repeat(50));
        assert_eq!(first_too_deep(&text, 32), None);
    }
}
