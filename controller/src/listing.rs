//! Pagination for ListVolumes and ListSnapshots.
//!
//! The token is the name of the last entry returned, so a page boundary survives
//! entries being added or deleted between calls (the list is sorted by name).

use crate::error::ControllerError;

const TOKEN_PREFIX: &str = "after:";

/// One page of `names` (sorted), starting after the token's name.
pub fn page<T>(
    mut items: Vec<(String, T)>,
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String), ControllerError> {
    if max_entries < 0 {
        return Err(ControllerError::InvalidArgument(format!(
            "max_entries must not be negative (got {max_entries})"
        )));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let start = if starting_token.is_empty() {
        0
    } else {
        let after = starting_token
            .strip_prefix(TOKEN_PREFIX)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ControllerError::Aborted(format!(
                    "starting_token {starting_token:?} was not issued by this plugin; restart the listing without a token"
                ))
            })?;
        items.partition_point(|(name, _)| name.as_str() <= after)
    };
    let rest = items.split_off(start);
    let take = if max_entries == 0 {
        rest.len()
    } else {
        max_entries as usize
    };
    let more = rest.len() > take;
    let page: Vec<(String, T)> = rest.into_iter().take(take).collect();
    let next = match (more, page.last()) {
        (true, Some((name, _))) => format!("{TOKEN_PREFIX}{name}"),
        _ => String::new(),
    };
    Ok((page.into_iter().map(|(_, t)| t).collect(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn pages_through_and_survives_deletion_of_the_boundary() {
        let (p1, t1) = page(items(&["c", "a", "b", "d"]), "", 2).unwrap();
        assert_eq!(p1, ["a", "b"]);
        assert_eq!(t1, "after:b");
        // "b" deleted and "bb" added between pages: the next page still continues correctly.
        let (p2, t2) = page(items(&["a", "bb", "c", "d"]), &t1, 2).unwrap();
        assert_eq!(p2, ["bb", "c"]);
        let (p3, t3) = page(items(&["a", "bb", "c", "d"]), &t2, 2).unwrap();
        assert_eq!((p3, t3), (vec!["d".to_string()], String::new()));
        let (all, t) = page(items(&["b", "a"]), "", 0).unwrap();
        assert_eq!(
            (all, t),
            (vec!["a".to_string(), "b".to_string()], String::new())
        );
    }

    #[test]
    fn bad_tokens_abort_and_negative_max_is_invalid() {
        assert_eq!(
            page(items(&["a"]), "garbage", 1).unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(items(&["a"]), "after:", 1).unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            page(items(&["a"]), "", -1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
