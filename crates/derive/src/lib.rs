//! `#[derive(Entity)]` for writethrough: a struct's table, its columns and
//! its key type, read from the struct's fields, so that the struct and its
//! table cannot drift apart.
//!
//! ```text
//! #[derive(Entity, Serialize, Deserialize)]
//! #[writethrough(table = "users")]      // default: the struct's name in snake_case
//! struct User {
//!     #[writethrough(key)]              // default: the field named `id`
//!     id: i64,
//!     name: String,
//!     email: Option<String>,            // a nullable column
//!     #[writethrough(json)]             // any serde type, as a JSON column
//!     tags: Vec<String>,
//! }
//! ```
//!
//! Column types come from the field types through `writethrough::ColumnKind`;
//! a field whose type has none is a compile error pointing at that type.
//! Names are checked here, at compile time, by the rules the engine applies
//! at run time. `#[serde(rename = "...")]` on a field renames its column;
//! `#[serde(skip)]` leaves the field out; serde attributes that reshape the
//! struct (`flatten`, `rename_all`, `transparent`, ...) are refused, since
//! the row would no longer match the declared columns.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt as _;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, LitStr, Meta, Token, Type, parse_macro_input};

/// Implements `writethrough::Entity` for a struct with named fields.
#[proc_macro_derive(Entity, attributes(writethrough))]
pub fn derive_entity(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The longest identifier the engine accepts (PostgreSQL's limit).
const MAX_IDENT_LEN: usize = 63;
const RESERVED_PREFIX: &str = "_wt_";

fn check_ident(name: &str, span: Span, what: &str) -> syn::Result<()> {
    let bad = |why: &str| Err(syn::Error::new(span, format!("{what} {name:?} {why}")));
    let Some(first) = name.bytes().next() else {
        return bad("is empty");
    };
    if name.len() > MAX_IDENT_LEN {
        return bad("is longer than 63 bytes");
    }
    if !(first.is_ascii_alphabetic() || first == b'_') {
        return bad("must start with an ASCII letter or '_'");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return bad("may hold only ASCII letters, digits and '_'");
    }
    if name.starts_with(RESERVED_PREFIX) {
        return bad("starts with '_wt_', which is reserved for writethrough");
    }
    Ok(())
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

struct Column<'a> {
    name: String,
    ty: &'a Type,
    key: bool,
    json: bool,
    span: Span,
}

/// Serde attributes that change the shape or names of the serialized struct.
const SERDE_STRUCT_REFUSED: &[&str] = &[
    "rename_all",
    "rename_all_fields",
    "transparent",
    "tag",
    "content",
    "untagged",
    "into",
    "from",
    "try_from",
    "remote",
];
const SERDE_FIELD_REFUSED: &[&str] = &["flatten", "skip_serializing", "skip_deserializing"];

fn serde_metas(attrs: &[syn::Attribute]) -> syn::Result<Vec<Meta>> {
    let mut out = Vec::new();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        out.extend(attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)?);
    }
    Ok(out)
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            input.ident.span(),
            "derive(Entity) needs a struct with named fields: one field per column",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new(
            data.fields.span(),
            "derive(Entity) needs named fields: a field's name is its column's name",
        ));
    };

    let mut table = None;
    let mut krate: syn::Path = syn::parse_quote!(::writethrough);
    for attr in input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("writethrough"))
    {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("table") {
                let lit: LitStr = meta.value()?.parse()?;
                check_ident(&lit.value(), lit.span(), "table name")?;
                table = Some(lit.value());
                Ok(())
            } else if meta.path.is_ident("crate") {
                let lit: LitStr = meta.value()?.parse()?;
                krate = lit.parse()?;
                Ok(())
            } else {
                Err(meta.error("expected `table = \"...\"` or `crate = \"...\"`"))
            }
        })?;
    }
    for meta in serde_metas(&input.attrs)? {
        if let Some(name) = SERDE_STRUCT_REFUSED
            .iter()
            .find(|n| meta.path().is_ident(n))
        {
            return Err(syn::Error::new(
                meta.span(),
                format!(
                    "derive(Entity) cannot follow #[serde({name})]: the row's columns are the \
                     struct's fields as declared (rename single fields with #[serde(rename = \"...\")])"
                ),
            ));
        }
    }
    let table = match table {
        Some(t) => t,
        None => {
            let t = snake_case(&input.ident.to_string());
            check_ident(&t, input.ident.span(), "table name")?;
            t
        }
    };

    let mut columns: Vec<Column<'_>> = Vec::new();
    for field in &fields.named {
        let ident = field.ident.as_ref().expect("named fields have names");
        let name = ident.unraw().to_string();
        let mut col = Column {
            name,
            ty: &field.ty,
            key: false,
            json: false,
            span: ident.span(),
        };
        let mut skipped = false;
        for meta in serde_metas(&field.attrs)? {
            if meta.path().is_ident("skip") {
                skipped = true;
            } else if meta.path().is_ident("rename") {
                match &meta {
                    Meta::NameValue(nv) => match &nv.value {
                        syn::Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Str(s),
                            ..
                        }) => {
                            col.name = s.value();
                            col.span = s.span();
                        }
                        other => {
                            return Err(syn::Error::new(other.span(), "expected a string"));
                        }
                    },
                    _ => {
                        return Err(syn::Error::new(
                            meta.span(),
                            "derive(Entity) needs one name per column: use \
                             #[serde(rename = \"...\")], not separate serialize and \
                             deserialize names",
                        ));
                    }
                }
            } else if let Some(n) = SERDE_FIELD_REFUSED.iter().find(|n| meta.path().is_ident(n)) {
                return Err(syn::Error::new(
                    meta.span(),
                    format!(
                        "derive(Entity) cannot follow #[serde({n})]: a row writes and reads \
                         every column (use #[serde(skip)] to leave a field out entirely)"
                    ),
                ));
            }
        }
        for attr in field
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("writethrough"))
        {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    col.key = true;
                    Ok(())
                } else if meta.path.is_ident("json") {
                    col.json = true;
                    Ok(())
                } else {
                    Err(meta.error("expected `key` or `json`"))
                }
            })?;
        }
        if skipped {
            if col.key {
                return Err(syn::Error::new(
                    field.span(),
                    "the key field cannot be skipped",
                ));
            }
            continue;
        }
        check_ident(&col.name, col.span, "column name")?;
        if let Some(prev) = columns.iter().find(|c| c.name == col.name) {
            let mut e =
                syn::Error::new(col.span, format!("column {:?} is declared twice", col.name));
            e.combine(syn::Error::new(prev.span, "first declared here"));
            return Err(e);
        }
        columns.push(col);
    }

    let marked: Vec<usize> = (0..columns.len()).filter(|&i| columns[i].key).collect();
    let key = match marked.as_slice() {
        [i] => *i,
        [] => columns.iter().position(|c| c.name == "id").ok_or_else(|| {
            syn::Error::new(
                input.ident.span(),
                "no key field: mark one with #[writethrough(key)] (a field named `id` is the \
                 key by default)",
            )
        })?,
        [_, second, ..] => {
            return Err(syn::Error::new(
                columns[*second].span,
                "only one field can be the key",
            ));
        }
    };
    if columns[key].json {
        return Err(syn::Error::new(
            columns[key].span,
            "the key field cannot be a JSON column",
        ));
    }

    let key_ty = columns[key].ty;
    let key_ty = quote_spanned! {key_ty.span()=> #key_ty};
    let entries = columns.iter().enumerate().map(|(i, c)| {
        let name = &c.name;
        let ty = c.ty;
        let is_key = i == key;
        if c.json {
            let nullable = is_option(ty);
            quote! { (#name, #krate::ColumnType::Json, #nullable, false) }
        } else {
            let kind = quote_spanned! {ty.span()=> <#ty as #krate::ColumnKind>};
            quote! { (#name, #kind::TYPE, #kind::NULLABLE, #is_key) }
        }
    });
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let build = quote! {
        #krate::__private::derived_table(#table, &[#(#entries),*])
    };
    // A static in a generic function is shared by every instantiation, so
    // only a non-generic entity keeps its table in one.
    let body = if input.generics.params.is_empty() {
        quote! {
            static TABLE: ::std::sync::OnceLock<#krate::Table> = ::std::sync::OnceLock::new();
            ::std::clone::Clone::clone(TABLE.get_or_init(|| #build))
        }
    } else {
        build
    };
    Ok(quote! {
        impl #impl_generics #krate::Entity for #ident #ty_generics #where_clause {
            type Key = #key_ty;
            fn table() -> #krate::Table {
                #body
            }
        }
    })
}

fn is_option(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Option"),
        _ => false,
    }
}
