DROP TABLE owui_crypto.protected_column, owui_crypto.protected_table;
