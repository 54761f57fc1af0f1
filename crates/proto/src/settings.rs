//! What the edge's and the agent's configuration files share: `FHECAM_*` environment
//! overrides of their sections.

/// The `FHECAM_<FIELD>...` variables that address one of `fields`.
pub fn env_overrides(
    vars: impl Iterator<Item = (String, String)>,
    fields: &[&str],
) -> std::collections::HashMap<String, String> {
    vars.filter(|(k, _)| {
        k.strip_prefix("FHECAM_").is_some_and(|rest| {
            let first = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
            fields.contains(&first.as_str())
        })
    })
    .collect()
}
