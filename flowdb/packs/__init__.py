"""SAE packs, the first stage: what a manifest says (manifest), where each SAE's files
come from (sources), attention SAEs projected through W_O (projection), the checked build
plan (plan), and packs made here: planted (synth) and trained on the demo model (demo_pack)."""
