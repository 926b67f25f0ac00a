// name: origins
// answers: Per layer of a pack, how many residual features are translated, processed, newborn
// answers: or from nowhere (the data-free categories, at the thresholds recorded with the build).
// param: pack string required  the pack name
// columns: layer, translated, processed, newborn, from_nowhere, total
MATCH (f:Feature {pack: $pack, module: 'res'})
WHERE f.layer IS NOT NULL
RETURN f.layer AS layer,
       sum(CASE f.category WHEN 'translated' THEN 1 ELSE 0 END) AS translated,
       sum(CASE f.category WHEN 'processed' THEN 1 ELSE 0 END) AS processed,
       sum(CASE f.category WHEN 'newborn' THEN 1 ELSE 0 END) AS newborn,
       sum(CASE f.category WHEN 'from-nowhere' THEN 1 ELSE 0 END) AS from_nowhere,
       count(f) AS total
ORDER BY layer
