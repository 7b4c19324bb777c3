//! The fixed data files the cases read (`$DT_DATA`): the same bytes on
//! every machine and every run, made from a fixed xorshift seed, in a
//! directory every node sees.
#![allow(dead_code)]

use std::path::Path;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

const VOCAB: &[&str] = &[
    "apple", "bridge", "cloud", "drum", "ember", "falcon", "garden", "harbor", "island", "jungle",
    "kernel", "lantern", "meadow", "nickel", "orbit", "pepper", "quartz", "river", "saddle",
    "timber", "umbrella", "velvet", "willow", "xenon", "yarrow", "zephyr", "node", "pipe", "fork",
    "exec", "shell", "stream",
];

/// `text`: 50000 lines of 2-6 words and a number (about 1.5 MB);
/// `words`: 500 words, one a line; `bin`: 4 MiB of pseudo-random bytes.
pub fn files() -> Vec<(&'static str, Vec<u8>)> {
    let mut r = XorShift(0x2545_f491_4f6c_dd1d);
    let mut text = String::new();
    for i in 0..50_000u64 {
        let n = 2 + r.next() % 5;
        for _ in 0..n {
            text.push_str(VOCAB[(r.next() % VOCAB.len() as u64) as usize]);
            text.push(' ');
        }
        text.push_str(&format!("{}\n", (r.next() % 10_000) ^ (i & 7)));
    }
    let mut words = String::new();
    for _ in 0..500 {
        words.push_str(VOCAB[(r.next() % VOCAB.len() as u64) as usize]);
        words.push('\n');
    }
    let mut bin = Vec::with_capacity(4 << 20);
    while bin.len() < 4 << 20 {
        bin.extend_from_slice(&r.next().to_le_bytes());
    }
    vec![
        ("text", text.into_bytes()),
        ("words", words.into_bytes()),
        ("bin", bin),
    ]
}

/// Write the files into `dir` unless they are there already with the
/// same contents (several runs may share the directory: a new file is
/// renamed into place, never written where a case may be reading it).
pub fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files() {
        let p = dir.join(name);
        if std::fs::read(&p).ok().as_deref() == Some(&bytes[..]) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
}
