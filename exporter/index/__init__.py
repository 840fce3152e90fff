"""The index wing: inotify events, the reader and updater, the pure tree, scans, the scrub, the lifecycle."""
