//! `imagefs::reference`: any UTF-8 string either fails to parse or gives a reference whose
//! `Display` parses back to the same reference (normalisation is idempotent).
#![no_main]

use imagefs::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let Ok(reference) = input.parse::<Reference>() else {
        return;
    };
    assert!(!reference.registry().is_empty());
    assert!(!reference.repository().is_empty());
    assert!(reference.tag().is_some() || reference.digest().is_some());
    assert!(
        reference.name().len() <= 255,
        "name too long: {}",
        reference.name()
    );
    assert!(!reference.api_host().is_empty());
    assert!(!reference.manifest_reference().is_empty());

    let shown = reference.to_string();
    let again: Reference = match shown.parse() {
        Ok(r) => r,
        Err(e) => panic!("{input:?} parsed, but its display {shown:?} does not: {e}"),
    };
    assert_eq!(again, reference, "display of {input:?} is {shown:?}");
    assert_eq!(again.to_string(), shown);

    if let Some(digest) = reference.digest() {
        let pinned = reference.with_digest(digest.clone());
        assert_eq!(pinned, reference);
        assert_eq!(reference.manifest_reference(), digest.to_string());
    }
});
