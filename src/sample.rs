//! Plausible synthetic patient records — for the load generator, the
//! benchmarks and the tests. Never real data.

use std::collections::HashMap;

/// A plausible ten-field patient record, distinct for each `i`.
pub fn sample_fields(i: u64) -> HashMap<String, String> {
    const FAMILY: [&str; 8] = [
        "Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand",
    ];
    const GIVEN: [&str; 8] = [
        "Camille", "Louis", "Léa", "Gabriel", "Chloé", "Jules", "Manon", "Hugo",
    ];
    let f = |k: &str, v: String| (k.to_string(), v);
    HashMap::from([
        f("family_name", FAMILY[(i % 8) as usize].to_string()),
        f("given_name", GIVEN[(i / 8 % 8) as usize].to_string()),
        f(
            "birth_date",
            format!("19{:02}-{:02}-{:02}", 30 + i % 70, 1 + i % 12, 1 + i % 28),
        ),
        f(
            "sex",
            if i.is_multiple_of(2) { "F" } else { "M" }.to_string(),
        ),
        f(
            "address",
            format!("{} rue de la République, 69002 Lyon", 1 + i % 200),
        ),
        f("phone", format!("+33 6 {:08}", i % 100_000_000)),
        f("email", format!("patient{i}@example.org")),
        f("nir", format!("{}{:012}", 1 + i % 2, i)),
        f(
            "blood_group",
            ["A+", "A-", "B+", "O+", "O-", "AB+"][(i % 6) as usize].to_string(),
        ),
        f(
            "treating_physician",
            format!("Dr {}", FAMILY[(i / 3 % 8) as usize]),
        ),
    ])
}
