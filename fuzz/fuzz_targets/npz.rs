//! Arbitrary bytes as a validation `.npz` and as a ranking filter: every array must be
//! read or refused, never panic (or abort on a huge allocation).
#![no_main]

use std::hint::black_box;

use aswa_merge::scoring::data::{Filter, Labels, Npz};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::write_input("data.npz", data);
    let mut filter_rows = vec![0usize, 1, 2, 7];
    if let Ok(mut npz) = Npz::open(&path) {
        let names = npz.names().to_vec();
        for name in &names {
            if let Ok(a) = npz.array(name) {
                black_box(a.shape());
                black_box(a.dtype_name());
                if let Ok(l) = Labels::from_array(&path, name, &a) {
                    black_box(l.rows());
                }
                // The row count a consistent filter would need.
                if name == "indptr" && a.shape().len() == 1 && a.shape()[0] > 0 {
                    filter_rows.push(a.shape()[0] - 1);
                }
            }
        }
        black_box(npz.array("no such array").is_err());
    }
    for rows in filter_rows {
        if let Ok(f) = Filter::load(&path, rows) {
            assert_eq!(f.indptr.len(), rows + 1);
            for r in 0..rows {
                let row = f.row(r);
                // Sorted and de-duplicated.
                assert!(row.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
});
