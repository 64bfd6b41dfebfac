//! Writes the generated application traces to `fixtures/traces/` (editor, game, notebook; see
//! `spawner_sim::generators` for their distributions and seeds).

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/traces");
    std::fs::create_dir_all(&dir)?;
    for (name, trace) in spawner_sim::generators::fixtures() {
        let path = dir.join(name);
        let file = std::fs::File::create(&path)?;
        let mut writer = std::io::BufWriter::new(file);
        trace.write(&mut writer)?;
        std::io::Write::flush(&mut writer)?;
        println!("{} ({} events)", path.display(), trace.events.len());
    }
    Ok(())
}
